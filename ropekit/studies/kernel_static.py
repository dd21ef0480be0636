"""Static analysis of the rotary kernel: compile it ahead of time for NVIDIA on any machine, read its code.

The Triton wheel carries the NVIDIA backend, ``ptxas`` and ``cuobjdump``, so ``triton.compile`` on an
``ASTSource`` with ``GPUTarget("cuda", 80 or 90, 32)`` builds PTX and a cubin without a GPU. Each case
is bound the way a real launch binds it: ``rope.launch_args`` builds the arguments from (meta) tensors
of the case's shapes and strides, and Triton's own binder specialises them (integers equal to 1 become
constants, integers and pointers divisible by 16 get ``tt.divisibility``), so the code read here is
the code a GPU would run for those tensors.

What is read, and from where:

- registers, stack and local memory: ``cuobjdump -res-usage`` on the cubin; spill bytes: the ptxas log;
- width of every q/k global access: the PTX (each ``ld.global``/``st.global`` address is traced back
  to the kernel parameter it is built from, so q/k accesses are told apart from positions and
  ``inv_freq``); SASS ``LDG``/``STG`` widths are counted too;
- instruction counts: the SASS (``cuobjdump -sass``) along the hot path, the straight line a thread
  runs when every guard of a cold region (sin/cos's Payne-Hanek reduction for |x| >= 105615, inf/nan)
  skips it: forward conditional branches taken, backward ones (loops) not taken.

A roofline *model* (not a measurement) turns those counts into an estimated fraction of copy
bandwidth; its assumptions are in ``DEVICES`` and printed with every report.

    python -m ropekit.studies.kernel_static --cases ci --json      # what tests/test_kernel_compile.py runs
    ropekit bench --static --out figures/kernel_static_after.csv

Run it in a process without ``TRITON_INTERPRET=1`` (the interpreter replaces ``@triton.jit``
functions); ``analyse`` does so in a subprocess when called from an interpreted process.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.util
import inspect
import io
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

import torch

from ropekit.results import make_row, provenance, read_rows

__all__ = [
    "Case",
    "DEVICES",
    "all_cases",
    "ci_cases",
    "nvidia_backend_missing",
    "compile_case",
    "analyse",
    "report_rows",
    "model_assumptions",
]

ARCHS = (80, 90)
DTYPES = ("float32", "float16", "bfloat16")
LAYOUTS = ("half", "interleaved")
HEAD_DIMS = ((64, 64), (128, 128), (80, 48))  # (D, rotary dim R)


@dataclass(frozen=True)
class Case:
    """One specialisation the patch or ``apply_rope``/``apply_rope_`` can launch.

    Tensors are as attention makes them: (B, T, H, D) projections viewed as (B, H, T, D).
    ``kind``: "train" (B=2, T=4096), "decode" (T=1, positions (B, 1): KV-cache offsets) or
    "big" (q past 2^31 elements: B=1, Hq=64, T=2^19+16).
    """

    dtype: str = "bfloat16"
    layout: str = "half"
    D: int = 128
    R: int = 128
    pos: str = "T"  # "T": positions (T,); "BT": (B, T)
    xpos: bool = False
    conjugate: bool = False
    inplace: bool = False
    kind: str = "train"
    Hq: int = 32
    Hk: int = 8

    @property
    def B(self) -> int:
        return 1 if self.kind == "big" else 2

    @property
    def T(self) -> int:
        return {"train": 4096, "decode": 1, "big": 2**19 + 16}[self.kind]

    @property
    def name(self) -> str:
        flags = [f for f, on in (("xpos", self.xpos), ("conj", self.conjugate), ("inplace", self.inplace)) if on]
        return ",".join(
            [self.dtype, self.layout, f"D={self.D}", f"R={self.R}", f"pos={self.pos}", f"H={self.Hq}/{self.Hk}",
             self.kind, *flags]
        )  # fmt: skip


def all_cases() -> list[Case]:
    """The 324 specialisations: 288 training ones (dtype x layout x head dim x positions x xPos x
    conjugate x in place) plus, per dtype x layout x head dim, decode (T=1) and > 2^31 elements."""
    out = []
    for dtype, layout, (D, R) in itertools.product(DTYPES, LAYOUTS, HEAD_DIMS):
        for pos, xpos, conj, inplace in itertools.product(("T", "BT"), (False, True), (False, True), (False, True)):
            out.append(Case(dtype, layout, D, R, pos, xpos, conj, inplace))
        out.append(Case(dtype, layout, D, R, "BT", kind="decode"))
        out.append(Case(dtype, layout, D, R, "T", kind="big", Hq=64, Hk=8))
    return out


def ci_cases() -> list[Case]:
    """A covering subset for CI: every value of every axis, and the risky combinations (interleaved x
    16-bit x D in {64, 128}, rotary 48 of 80 in place, Hq = 64, GQA 32/8, decode, > 2^31 elements)."""
    cases = [
        Case("bfloat16", "interleaved", 128, 128, "BT", xpos=True),
        Case("float16", "interleaved", 64, 64, "T", conjugate=True, inplace=True),
        Case("bfloat16", "half", 64, 64, "T", inplace=True),
        Case("float16", "half", 128, 128, "BT", xpos=True, conjugate=True),
        Case("bfloat16", "interleaved", 80, 48, "T", inplace=True),  # the sm_80 spill of the first kernel
        Case("float32", "half", 80, 48, "BT", xpos=True, conjugate=True, inplace=True),
        Case("float32", "interleaved", 128, 128, "T"),
        Case("bfloat16", "interleaved", 128, 128, "BT", kind="decode"),
        Case("float16", "half", 80, 48, "BT", kind="decode"),
        Case("bfloat16", "interleaved", 128, 128, "T", kind="big", Hq=64, Hk=8),
        Case("float32", "half", 64, 64, "T", kind="big", Hq=64, Hk=8),
    ]
    return cases


# ------------------------------------------------------------------------------------------------
# Device model (for the roofline estimate only; nothing here is measured)
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Device:
    name: str
    sms: int
    clock_ghz: float  # sustained boost clock
    dram_tb_s: float  # achievable copy bandwidth (read + write), below the datasheet peak
    latency_ns: float  # DRAM load latency under load
    regs_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    schedulers: int = 4  # warp instructions issued per SM per clock
    fp64_per_sm_clk: int = 32  # fp64 lanes (FMA) per SM per clock
    sfu_per_sm_clk: int = 16  # MUFU lanes per SM per clock


DEVICES = {
    80: Device("A100-SXM4-80GB", sms=108, clock_ghz=1.41, dram_tb_s=1.75, latency_ns=600.0),
    90: Device("H100-SXM5", sms=132, clock_ghz=1.755, dram_tb_s=3.0, latency_ns=700.0, fp64_per_sm_clk=64),
}


def model_assumptions() -> str:
    lines = ["Roofline MODEL (static estimate from counted instructions, not a measurement; no GPU timing exists):"]
    for arch, d in DEVICES.items():
        lines.append(
            f"  sm_{arch} = {d.name}: {d.sms} SMs at {d.clock_ghz} GHz, {d.schedulers} warp-instructions/SM/clock, "
            f"copy bandwidth {d.dram_tb_s} TB/s, DRAM latency {d.latency_ns:.0f} ns, fp64 {d.fp64_per_sm_clk} and "
            f"MUFU {d.sfu_per_sm_clk} lanes/SM/clock, {d.regs_per_sm} registers, {d.max_warps_per_sm} warps and "
            f"{d.max_blocks_per_sm} blocks per SM."
        )
    lines.append(
        "  time per program = max(bytes / bandwidth share, hot-path warp-instructions / issue rate, fp64 and MUFU "
        "pipe time, serial memory trips x latency / resident blocks); estimate = copy time / that time; "
        "'issue needed' = hot-path warp-instructions per 16 B x 16-B chunks per SM-clock at copy bandwidth "
        "/ issue rate. "
        "Ignores caches, tail effects, launch overhead, dual issue and instruction latency beyond the trips."
    )
    return "\n".join(lines)


def blocks_per_sm(regs: int, num_warps: int, dev: Device) -> int:
    """Occupancy by registers (allocated per warp in units of 256), warps and the block limit."""
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    warps_by_regs = dev.regs_per_sm // per_warp
    return max(0, min(warps_by_regs // num_warps, dev.max_warps_per_sm // num_warps, dev.max_blocks_per_sm))


# ------------------------------------------------------------------------------------------------
# Binding and compiling
# ------------------------------------------------------------------------------------------------
def nvidia_backend_missing() -> str | None:
    """None when this Triton can compile for NVIDIA here, else a one-line reason."""
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
    except ImportError as err:
        return f"no usable triton ({err})"
    try:
        make_backend(GPUTarget("cuda", 90, 32))
    except Exception as err:  # noqa: BLE001 - any failure means: no NVIDIA backend in this wheel
        return f"this triton wheel has no NVIDIA backend ({type(err).__name__}: {err})"
    from triton.backends.nvidia import compiler as nv

    try:
        nv.get_ptxas(90) if _takes_arch(nv.get_ptxas) else nv.get_ptxas()
    except Exception as err:  # noqa: BLE001
        return f"this triton wheel ships no ptxas ({err})"
    return None


def _takes_arch(fn) -> bool:
    return len(inspect.signature(fn).parameters) > 0


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else name


@dataclass
class Launch:
    """What a real launch binds: the JIT kernel, its arguments, grid, and what the report needs."""

    kernel: object
    args: tuple
    meta: dict
    grid: tuple
    qk_params: tuple  # names of the q/k (and output) pointer parameters
    bytes_per_program: float


def _meta_tensors(case: Case):
    dt = getattr(torch, case.dtype)
    B, T, D = case.B, case.T, case.D
    q = torch.empty(B, T, case.Hq, D, device="meta", dtype=dt).transpose(1, 2)  # (B, Hq, T, D), as attention
    k = torch.empty(B, T, case.Hk, D, device="meta", dtype=dt).transpose(1, 2)
    positions = torch.empty((T,) if case.pos == "T" else (B, T), device="meta", dtype=torch.int64)
    return q, k, positions


def _elem(case: Case) -> int:
    return {"float32": 4, "float16": 2, "bfloat16": 2}[case.dtype]


def ropekit_launch(case: Case) -> Launch:
    """The kernel, bound by the real launcher's code (``rope.launch_args``) on meta tensors."""
    from ropekit.kernels import rope

    q, k, positions = _meta_tensors(case)
    inv_freq = torch.empty(case.R // 2, device="meta", dtype=torch.float64)
    xpos_rate = torch.empty_like(inv_freq) if case.xpos else None
    q_out, k_out = (q, k) if case.inplace else (torch.empty_like(q), torch.empty_like(k))
    grid, args, meta = rope.launch_args(
        q, k, q_out, k_out, positions, inv_freq, xpos_rate, interleaved=case.layout == "interleaved",
        attention_factor=1.0, xpos_center=50000 if case.xpos else 0, conjugate=case.conjugate, inplace=case.inplace,
    )  # fmt: skip
    moved_d = case.R if case.inplace else case.D  # in place, the pass-through channels are not touched
    total = 2 * case.B * case.T * (case.Hq + case.Hk) * moved_d * _elem(case) + positions.numel() * 8
    programs = grid[0] * (grid[1] if len(grid) > 1 else 1)
    return Launch(rope._rope_kernel, args, meta, grid, ("Q", "K", "QO", "KO"), total / programs)


class _Recorder:
    """Stands in for a peer's ``@triton.jit`` kernel: records ``kernel[grid](*args, **kw)``, launches nothing."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        return lambda *args, **kw: self.calls.append((grid, args, kw))


def _load_file(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def peer_cases() -> list[Case]:
    """Peers read a cos/sin table: half layout, no xPos; their kernels write in place or out, as they do."""
    return [c for c in all_cases() if c.layout == "half" and not c.xpos and not c.inplace]


def liger_launch(case: Case, path: str) -> Launch:
    """Liger-Kernel's ``_triton_rope`` bound by its own ``rope_forward`` (backward: ``rope_backward``)
    on meta tensors, with an HF cos/sin table (B or 1, T, R) in the activation dtype."""
    mod = _load_file("liger_rope", path)
    rec = _Recorder(mod._triton_rope)
    mod._triton_rope = rec
    q, k, _ = _meta_tensors(case)
    cb = case.B if case.pos == "BT" else 1
    cos = torch.empty(cb, case.T, case.R, device="meta", dtype=q.dtype)
    fn = mod.rope_backward if case.conjugate else mod.rope_forward
    kw = {"rotary_dim": case.R} if case.R != case.D else {}
    fn(q, k, cos, cos, **kw)
    grid, args, meta = rec.calls[-1]
    # in place on the rotary channels: q, k read and written; half of each cos and sin row read
    total = 2 * case.B * case.T * (case.Hq + case.Hk) * case.R * _elem(case) + case.B * case.T * case.R * _elem(case)
    return Launch(rec.kernel, args, meta, tuple(grid), ("q_ptr", "k_ptr"), total / grid[0])


def flash_attn_launch(case: Case, path: str) -> Launch:
    """flash-attention's Triton ``rotary_kernel`` bound by its ``apply_rotary`` (q and k: two launches;
    q's is compiled) on meta tensors, cos/sin (T, R/2) in the activation dtype."""
    mod = _load_file("fa_rotary", path)
    rec = _Recorder(mod.rotary_kernel)
    mod.rotary_kernel = rec
    q, _, _ = _meta_tensors(case)
    cos = torch.empty(case.T, case.R // 2, device="meta", dtype=q.dtype)
    x = q.transpose(1, 2)  # flash-attention takes (B, T, H, D)
    wrap = getattr(torch.library, "wrap_triton", None)  # some versions launch through it: launch the recorder
    cuda_device = torch.cuda.device  # it enters torch.cuda.device(x.device.index): None on meta tensors
    try:
        if wrap is not None:
            torch.library.wrap_triton = lambda kernel: kernel
        torch.cuda.device = lambda index: contextlib.nullcontext()
        mod.apply_rotary(x, cos, cos, interleaved=False, inplace=False, conjugate=case.conjugate)
    finally:
        torch.cuda.device = cuda_device
        if wrap is not None:
            torch.library.wrap_triton = wrap
    grid, args, meta = rec.calls[-1]
    if callable(grid):
        grid = grid({**meta, "BLOCK_M": meta.get("BLOCK_M", 8)})
    total = 2 * case.B * case.T * case.Hq * case.D * _elem(case) + case.B * case.T * case.R * _elem(case)
    programs = 1
    for g in grid:
        programs *= g
    return Launch(rec.kernel, args, meta, tuple(grid), ("OUT", "X"), total / programs)


def _specialise(kernel, backend, args, meta):
    """Triton's own binding of a launch: (options, signature, constexprs, attrs), as ``JITFunction.run``."""
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **meta)
    return kernel._pack_args(backend, meta, bound, specialization, options)


@dataclass
class Compiled:
    ok: bool
    error: str = ""
    regs: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    local: int = 0
    stack: int = 0
    num_warps: int = 0
    ptx_qk_bits: dict = field(default_factory=dict)  # {"ld": [widths...], "st": [...]} per q/k access
    sass_mem_bits: dict = field(default_factory=dict)  # {"LDG": {width: count}, "STG": {...}}
    hot: dict = field(default_factory=dict)  # hot-path SASS counts per thread: total, fp64, mufu, mem, ...
    sass_total: int = 0
    constexprs: dict = field(default_factory=dict)  # specialised arguments: name -> value
    signature: dict = field(default_factory=dict)  # runtime arguments: name -> type (i32, i64, *bf16, ...)


def compile_case(case: Case, arch: int) -> Compiled:
    """Compile ropekit's kernel for one case for sm_<arch> and read its registers, spills, accesses, SASS."""
    return compile_launch(ropekit_launch(case), arch)


def compile_launch(launch: Launch, arch: int) -> Compiled:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    kernel, args, meta = launch.kernel, launch.args, launch.meta
    if not hasattr(kernel, "params"):
        raise RuntimeError("the kernel is interpreted (TRITON_INTERPRET=1): compile in a fresh process")
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    options, signature, constexprs, attrs = _specialise(kernel, backend, args, meta)
    src = ASTSource(kernel, signature, constexprs, attrs)
    log = io.StringIO()
    try:
        with _ptxas_log(), contextlib.redirect_stdout(log):
            ck = triton.compile(src, target=target, options=options.__dict__)
    except Exception as err:  # noqa: BLE001 - a failed compile is a result
        return Compiled(ok=False, error=f"{type(err).__name__}: {str(err)[:500]}")
    out = Compiled(ok=True, num_warps=ck.metadata.num_warps)
    out.constexprs = {kernel.arg_names[k[0]]: v for k, v in constexprs.items() if isinstance(v, (int, float, bool))}
    out.signature = {k: v for k, v in signature.items() if v != "constexpr"}
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
    if m:
        out.spill_stores, out.spill_loads = int(m.group(1)), int(m.group(2))
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as fh:
            fh.write(ck.asm["cubin"])
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin], capture_output=True, text=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True).stdout
    usage = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", res))
    out.regs, out.stack, out.local = int(usage.get("REG", 0)), int(usage.get("STACK", 0)), int(usage.get("LOCAL", 0))
    if not m:  # no ptxas log captured: spills show as local memory and STL/LDL instructions
        out.spill_stores = out.spill_loads = -1
    runtime = [name for name, ty in signature.items() if ty != "constexpr"]  # the PTX parameters, in order
    out.ptx_qk_bits = ptx_qk_accesses(ck.asm["ptx"], {runtime.index(n) for n in launch.qk_params if n in runtime})
    instrs = sass_instructions(sass)
    out.sass_total = len(instrs)
    out.sass_mem_bits = _mem_widths(instrs)
    out.hot = hot_path_counts(instrs)
    return out


@contextlib.contextmanager
def _ptxas_log():
    """Have Triton print ptxas's -v log (registers, spills) to stdout, and compile even on a cache hit."""
    try:
        from triton import knobs
    except ImportError:
        yield
        return
    old = (knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile)
    knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True
    try:
        yield
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = old


# ------------------------------------------------------------------------------------------------
# Reading PTX and SASS
# ------------------------------------------------------------------------------------------------
_PTX_INSTR = re.compile(r"^\s*(@!?%p\d+\s+)?([a-z][\w.]*)\s+(.*?);", re.M)
_REG = re.compile(r"%[a-z]+\d+")


def ptx_qk_accesses(ptx: str, qk_params: set) -> dict:
    """Widths (bits) of the global loads/stores whose address derives from the given PTX parameters."""
    defs: dict[str, set] = {}
    roots: dict[str, set] = {}
    accesses = []
    for _, op, operands in _PTX_INSTR.findall(ptx):
        if op.startswith(("ld.global", "st.global")):
            addr = re.search(r"\[\s*(%rd\d+)", operands)
            vec = re.search(r"\.v(\d)", op)
            bits = re.search(r"\.[bsuf](8|16|32|64)\b", op)
            if addr and bits:
                width = (int(vec.group(1)) if vec else 1) * int(bits.group(1))
                accesses.append(("ld" if op.startswith("ld") else "st", addr.group(1), width))
            if op.startswith("st"):
                continue
        regs = _REG.findall(operands)
        if not regs:
            continue
        dst = regs[0] if not operands.lstrip().startswith("{") else None
        if op.startswith("ld.param"):
            p = re.search(r"_param_(\d+)", operands)
            if p and dst:
                roots.setdefault(dst, set()).add(int(p.group(1)))
            continue
        if dst:
            defs.setdefault(dst, set()).update(regs[1:])

    memo: dict[str, set] = {}

    def params_of(reg: str, seen=None) -> set:
        if reg in memo:
            return memo[reg]
        seen = seen or set()
        if reg in seen:
            return set()
        seen.add(reg)
        out = set(roots.get(reg, ()))
        for src in defs.get(reg, ()):
            out |= params_of(src, seen)
        memo[reg] = out
        return out

    result: dict[str, list] = {"ld": [], "st": []}
    for kind, reg, width in accesses:
        if params_of(reg) & qk_params:
            result[kind].append(width)
    return result


_SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", re.M)


def sass_instructions(sass: str) -> list[tuple[int, str, str]]:
    """[(address, predicate, instruction text)] of the first kernel in a cuobjdump -sass listing."""
    out = []
    for addr, text in _SASS_LINE.findall(sass):
        pred = ""
        mp = re.match(r"(@!?U?P[T\d])\s+(.*)", text)
        if mp:
            pred, text = mp.group(1), mp.group(2)
        out.append((int(addr, 16), pred, text.strip()))
    return out


def _opcode(text: str) -> str:
    return text.split()[0] if text else ""


def _width(op: str) -> int:
    for tag, bits in ((".128", 128), (".64", 64), (".U16", 16), (".S16", 16), (".U8", 8), (".S8", 8)):
        if tag in op:
            return bits
    return 32


def _mem_widths(instrs) -> dict:
    """{"LDG": {bits: count}, "STG": {...}, "LDL": {...}, "STL": {...}} over the whole SASS."""
    out: dict[str, dict] = {"LDG": {}, "STG": {}, "LDL": {}, "STL": {}}
    for _, _, text in instrs:
        op = _opcode(text)
        base = op.split(".")[0]
        if base in out:
            w = _width(op)
            out[base][w] = out[base].get(w, 0) + 1
    return out


def _is_fp64(op: str) -> bool:
    return op.startswith(("DADD", "DMUL", "DFMA", "DSETP", "DMNMX", "DSET")) or ".F64" in op


def _regs(operand_text: str) -> list[int]:
    return [int(r) for r in re.findall(r"\bR(\d+)\b", operand_text)]


def hot_path_counts(instrs) -> dict:
    """Instruction counts along the hot path of one thread (see the module docstring), and its serial
    memory trips: a load issued after an instruction that waited for an earlier load's data starts a
    new trip (in-order issue: it cannot leave before that data came back)."""
    index = {addr: i for i, (addr, _, _) in enumerate(instrs)}
    counts = {"total": 0, "fp64": 0, "mufu": 0, "ldg": 0, "stg": 0, "local": 0, "bar": 0, "trips": 0}
    outstanding: dict[int, int] = {}  # register -> trip of the load that writes it
    level = 0  # the latest trip whose data this thread has waited for
    i, steps = 0, 0
    while 0 <= i < len(instrs) and steps < 100_000:
        steps += 1
        addr, pred, text = instrs[i]
        op = _opcode(text)
        if op == "EXIT" and not pred:
            counts["total"] += 1
            break
        if op != "NOP":
            counts["total"] += 1
            counts["fp64"] += _is_fp64(op)
            counts["mufu"] += op.startswith("MUFU")
            counts["ldg"] += op.startswith("LDG")
            counts["stg"] += op.startswith("STG")
            counts["local"] += op.startswith(("LDL", "STL"))
            counts["bar"] += op.startswith("BAR")
            operands = text[len(op) :].split(",")
            is_store = op.startswith(("STG", "STL", "ST.", "RED", "ATOM"))
            dst = [] if is_store else _regs(operands[0]) if operands else []
            srcs = _regs(",".join(operands if is_store else operands[1:]))
            waited = [outstanding[r] for r in srcs if r in outstanding]
            if waited:
                level = max(level, *waited)
            if op.startswith("LDG") and dst:
                trip = level + 1
                counts["trips"] = max(counts["trips"], trip)
                for r in range(dst[0], dst[0] + max(1, _width(op) // 32)):
                    outstanding[r] = trip
            else:
                for r in dst:
                    outstanding.pop(r, None)
        if op == "BRA":
            m = re.search(r"(0x[0-9a-f]+)", text)
            target = int(m.group(1), 16) if m else None
            if target is not None and target in index:
                if not pred:
                    if index[target] <= i:  # the trailing `BRA self` after EXIT
                        break
                    i = index[target]
                    continue
                if target > addr:  # a guard skipping a cold region: taken
                    i = index[target]
                    continue
        i += 1
    return counts


# ------------------------------------------------------------------------------------------------
# Summaries, the roofline model, rows
# ------------------------------------------------------------------------------------------------
def summarise(launch: Launch, arch: int, c: Compiled) -> dict:
    """The report's numbers for one compiled launch (plain floats/ints)."""
    dev = DEVICES[arch]
    s = {"compiled": int(c.ok)}
    if not c.ok:
        return s
    nbytes = launch.bytes_per_program
    warps = c.num_warps
    hot = c.hot
    warp_instr = hot["total"] * warps
    bps = blocks_per_sm(c.regs, warps, dev)
    qk = c.ptx_qk_bits.get("ld", []) + c.ptx_qk_bits.get("st", [])
    trips = max(hot["trips"], 1)  # serial DRAM round trips along the hot path
    programs_per_sm_clk = 1.0 / max(
        nbytes / (dev.dram_tb_s * 1e12 / dev.sms) * dev.clock_ghz * 1e9,  # bandwidth share, clocks
        warp_instr / dev.schedulers,
        hot["fp64"] * warps * 32 / dev.fp64_per_sm_clk,
        hot["mufu"] * warps * 32 / dev.sfu_per_sm_clk,
        trips * dev.latency_ns * dev.clock_ghz / max(bps, 1),
    )
    chunks_per_sm_clk = dev.dram_tb_s * 1e12 / dev.sms / dev.clock_ghz / 1e9 / 16  # 16-byte chunks at copy speed
    issue_needed = warp_instr / (nbytes / 16) * chunks_per_sm_clk / dev.schedulers
    copy_programs_per_sm_clk = (dev.dram_tb_s * 1e12 / dev.sms) / dev.clock_ghz / 1e9 / nbytes
    s.update(
        registers=c.regs,
        spill_bytes=max(c.spill_stores, 0) + max(c.spill_loads, 0),
        local_bytes=c.local + c.stack,
        blocks_per_sm=bps,
        num_warps=warps,
        bytes_per_program=nbytes,
        qk_access_bits_min=min(qk) if qk else 0,
        qk_access_bits_max=max(qk) if qk else 0,
        qk_mem_instr_per_thread=len(qk),
        hot_instr_per_thread=hot["total"],
        warp_instr_per_16B=warp_instr / (nbytes / 16),
        fp64_per_thread=hot["fp64"],
        mufu_per_thread=hot["mufu"],
        memory_trips=trips,
        issue_pct_needed=100.0 * issue_needed,
        roofline_pct_of_copy=100.0 * min(1.0, programs_per_sm_clk / copy_programs_per_sm_clk),
    )
    return s


def _analyse_here(cases, archs=ARCHS, jobs=1, log=None, provider="ropekit-triton", path=None) -> list[dict]:
    """Bind every case, compile each distinct specialisation once (cases that bind to the same
    signature, constants, attributes and options run the same binary), and summarise every case."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    backends = {arch: make_backend(GPUTarget("cuda", arch, 32)) for arch in archs}
    bound, keys, unique = [], [], {}
    for case in cases:
        for arch in archs:
            try:
                launch = ropekit_launch(case) if provider == "ropekit-triton" else PEERS[provider](case, path)
                options, signature, constexprs, attrs = _specialise(launch.kernel, backends[arch], launch.args,
                                                                    launch.meta)  # fmt: skip
                key = repr((arch, signature, sorted(constexprs.items()), sorted(attrs.items()), options))
            except Exception as err:  # noqa: BLE001 - a launcher that cannot be bound here is a result
                launch, key = None, f"bind: {type(err).__name__}: {err}"
            bound.append((case, arch, launch))
            keys.append(key)
            if launch is not None:
                unique.setdefault(key, (case, arch, provider, path))
    if jobs > 1 and len(unique) > 1:
        with ProcessPoolExecutor(jobs) as pool:
            compiled = dict(zip(unique, pool.map(_compile_one, unique.values(), chunksize=1), strict=True))
    else:
        compiled = {k: _compile_one(w) for k, w in unique.items()}
    results = []
    for (case, arch, launch), key in zip(bound, keys, strict=True):
        c = compiled.get(key) or Compiled(ok=False, error=key)
        summary = summarise(launch, arch, c) if launch is not None else {"compiled": 0}
        results.append({"case": asdict(case), "name": case.name, "arch": arch, "provider": provider,
                        "error": c.error, "summary": summary, "ptx_qk_bits": c.ptx_qk_bits,
                        "sass_mem_bits": c.sass_mem_bits, "hot": c.hot, "constexprs": c.constexprs,
                        "signature": c.signature, "distinct_binaries": len(unique)})  # fmt: skip
    if log:
        for r in results:
            log(_fmt(r))
        log(f"{provider}: {len(results)} case x arch, {len(unique)} distinct specialisations compiled")
    return results


PEERS = {"liger": liger_launch, "flash-attn-triton": flash_attn_launch}


def _compile_one(work) -> Compiled:
    case, arch, provider, path = work
    launch = ropekit_launch(case) if provider == "ropekit-triton" else PEERS[provider](case, path)
    return compile_launch(launch, arch)


def _fmt(r: dict) -> str:
    s = r["summary"]
    if not s.get("compiled"):
        return f"{r['provider']} sm_{r['arch']} {r['name']}: FAILED {r['error']}"
    return (f"{r['provider']} sm_{r['arch']} {r['name']}: {s['registers']} regs, {s['blocks_per_sm']} blocks/SM, spill "
            f"{s['spill_bytes']} B, local {s['local_bytes']} B, q/k access {s['qk_access_bits_min']}-"
            f"{s['qk_access_bits_max']} bit, {s['hot_instr_per_thread']} hot instr/thread, "
            f"{s['warp_instr_per_16B']:.2f} warp-instr/16B, fp64 {s['fp64_per_thread']}, mufu {s['mufu_per_thread']}, "
            f"{s['memory_trips']} trips; model: needs {s['issue_pct_needed']:.0f}% of issue at copy speed, "
            f"{s['roofline_pct_of_copy']:.0f}% of copy")  # fmt: skip


def analyse(cases, archs=ARCHS, jobs=1, log=None, cache_dir=None, provider="ropekit-triton", path=None) -> list[dict]:
    """Compile and read every case for every arch (``provider``: ropekit's kernel or a peer's, loaded
    from ``path``). Where the kernel is interpreted (TRITON_INTERPRET=1, as in the CPU test suite), or
    a fresh Triton cache is asked for, this runs in a clean subprocess."""
    from ropekit.kernels import rope

    if hasattr(rope._rope_kernel, "params") and cache_dir is None:
        return _analyse_here(cases, archs, jobs, log, provider, path)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if cache_dir is not None:
        env["TRITON_CACHE_DIR"] = cache_dir
    spec = {"cases": [asdict(c) for c in cases], "archs": list(archs), "jobs": jobs, "provider": provider, "path": path}
    proc = subprocess.run([sys.executable, "-m", "ropekit.studies.kernel_static", "--stdin"], input=json.dumps(spec),
                          capture_output=True, text=True, env=env)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"static analysis subprocess failed:\n{proc.stderr[-4000:]}")
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    if log:
        for r in results:
            log(_fmt(r))
    return results


def report_rows(results: list[dict], stage: str) -> list[dict]:
    """Long-format result rows (``ropekit.results``): one per case x arch x metric."""
    prov = provenance("cpu")
    prov["device"] = "static (ptxas/cuobjdump on CPU; no GPU)"
    rows = []
    for r in results:
        s = r["summary"]
        provider = r["provider"]
        config = {**r["case"], "arch": f"sm_{r['arch']}", "stage": stage, "provider": provider,
                  "model": DEVICES[r["arch"]].name if s.get("compiled") else ""}  # fmt: skip
        if r.get("error"):
            config["error"] = r["error"][:200]
        for metric, value in s.items():
            variant = f"{stage}/{provider}/sm_{r['arch']}/{r['name']}"
            T = Case(**r["case"]).T
            rows.append(make_row(experiment="kernel_static", variant=variant, metric=metric, context_length=T,
                                 value=value, n=1, seed=0, config=config, prov=prov))  # fmt: skip
    return rows


def summary(paths: list[str]) -> str:
    """Ranges (min-max) of the headline figures per stage x provider x arch x layout x dtype class,
    read back from report CSVs: what docs/kernel.md quotes."""
    groups: dict = collections.defaultdict(lambda: collections.defaultdict(list))
    for path in paths:
        for row in read_rows(path):
            if row["experiment"] != "kernel_static":
                continue
            cfg = json.loads(row["config"])
            bits = "fp32" if cfg["dtype"] == "float32" else "16-bit"
            key = (cfg["stage"], cfg["provider"], cfg["arch"], cfg["layout"], bits)
            groups[key][row["metric"]].append(float(row["value"]))
    metrics = ("compiled", "registers", "spill_bytes", "local_bytes", "blocks_per_sm", "qk_access_bits_min",
               "warp_instr_per_16B", "fp64_per_thread", "memory_trips", "issue_pct_needed",
               "roofline_pct_of_copy")  # fmt: skip
    lines = ["stage provider arch layout dtype cases | " + " | ".join(metrics)]
    for key in sorted(groups):
        g = groups[key]
        cells = []
        for m in metrics:
            v = g.get(m, [])
            if not v:
                cells.append("-")
            elif m == "compiled":
                cells.append(f"{int(sum(v))}/{len(v)}")
            else:
                lo, hi = min(v), max(v)
                fmt = (lambda x: f"{x:.2f}") if m == "warp_instr_per_16B" else (lambda x: f"{x:.0f}")
                cells.append(fmt(lo) if lo == hi else f"{fmt(lo)}-{fmt(hi)}")
        lines.append(" ".join(key) + f" {len(g.get('compiled', []))} | " + " | ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="compile the rotary kernel for sm_80/sm_90 on CPU and read its code")
    p.add_argument("--cases", choices=("ci", "all"), default="ci")
    p.add_argument("--arch", default="80,90")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--provider", default="ropekit-triton", choices=("ropekit-triton", *PEERS))
    p.add_argument("--path", default=None, help="a peer's kernel file (liger_kernel/ops/rope.py, ...)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON line")
    p.add_argument("--stdin", action="store_true", help="read {cases, archs, jobs} as JSON from stdin")
    p.add_argument("--summary", nargs="+", default=None, help="print ranges from report CSVs and exit")
    args = p.parse_args(argv)
    if args.summary:
        print(summary(args.summary))
        return 0
    if args.stdin:
        spec = json.loads(sys.stdin.read())
        cases = [Case(**c) for c in spec["cases"]]
        results = _analyse_here(cases, tuple(spec["archs"]), spec["jobs"], None, spec["provider"], spec["path"])
        print(json.dumps(results))
        return 0
    reason = nvidia_backend_missing()
    if reason:
        print(f"skipped: {reason}")
        return 0
    cases = ci_cases() if args.cases == "ci" else all_cases()
    if args.provider != "ropekit-triton":
        cases = [c for c in cases if c in set(peer_cases())] or peer_cases()[:4]
    archs = tuple(int(a) for a in args.arch.split(","))
    log = None if args.json else print
    results = _analyse_here(cases, archs, args.jobs, log, args.provider, args.path)
    if args.json:
        print(json.dumps(results))
    else:
        print(model_assumptions())
    return 0


if __name__ == "__main__":
    sys.exit(main())
