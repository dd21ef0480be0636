"""The studies: experiments built on the ropekit library, each in its own module with its settings, runner,
summary, table and figure.

- ``ablation``: the paper's positional-encoding ablation (``ropekit demo``);
- ``sweep``: training-free candidates scored on the same prompts, paired differences (``ropekit sweep``);
- ``advise``: closed-form advice on a method and base for a target length (``ropekit advise``);
- ``bench``: the rotary kernel against its peers, and a training step's speed and memory (``ropekit bench``);
- ``kernel_static``: the kernel's machine code compiled ahead of time, its registers, spills, access widths and
  a roofline estimate (``python -m ropekit.studies.kernel_static``).

The library below (methods, reference, rotary, kernels, hf, models, data, eval, train, results, figures)
imports none of them.
"""
