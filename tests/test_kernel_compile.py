"""The Triton kernel compiles for sm_80 and sm_90 on this CPU machine, and its machine code is sound.

``ropekit.studies.kernel_static`` compiles a covering set of the specialisations the patch and
``apply_rope``/``apply_rope_`` launch (every dtype, layout, head dim, positions shape, xPos,
conjugate, in place, plus decode and > 2^31 elements), bound as a real launch binds them, in a fresh
process (this one runs the kernel in Triton's interpreter) with a fresh Triton cache. From ptxas,
cuobjdump and the PTX it checks: it compiles; no spills and no local memory; q/k global accesses are
128-bit for 16-bit dtypes at D in {64, 128} in both layouts; at most 128 registers per thread.
``ropekit bench --static`` runs the full cartesian set (324 cases) and writes the figures.
"""

import pytest

pytest.importorskip("triton")

from ropekit.studies import kernel_static as static  # noqa: E402

_REASON = static.nvidia_backend_missing()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"no AOT compile: {_REASON}")

CASES = static.ci_cases()
ARCHS = static.ARCHS


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("triton_cache"))  # cold cache: what is checked is compiled now
    results = static.analyse(CASES, ARCHS, jobs=2, cache_dir=cache)
    return {(r["name"], r["arch"]): r for r in results}


def test_the_ci_set_covers_every_axis_and_the_risky_combinations():
    for axis, values in (("dtype", static.DTYPES), ("layout", static.LAYOUTS), ("pos", ("T", "BT")),
                         ("xpos", (False, True)), ("conjugate", (False, True)), ("inplace", (False, True)),
                         ("kind", ("train", "decode", "big"))):  # fmt: skip
        assert {getattr(c, axis) for c in CASES} == set(values), axis
    assert {(c.D, c.R) for c in CASES} == set(static.HEAD_DIMS)
    risky = {
        "interleaved x 16-bit x D=64": lambda c: c.layout == "interleaved" and c.dtype != "float32" and c.D == 64,
        "interleaved x 16-bit x D=128": lambda c: c.layout == "interleaved" and c.dtype != "float32" and c.D == 128,
        "rotary 48 of 80 in place": lambda c: c.R == 48 and c.inplace,
        "Hq = 64": lambda c: c.Hq == 64,
        "GQA 32/8": lambda c: (c.Hq, c.Hk) == (32, 8),
        "decode": lambda c: c.T == 1,
        "> 2^31 elements": lambda c: c.B * c.Hq * c.T * c.D > 2**31,
    }
    for name, pred in risky.items():
        assert any(pred(c) for c in CASES), name


def test_binding_specialises_like_a_launch(compiled):
    # unit strides and T = 1 become constants, strides past 2^31 are 64-bit: the code checked is the code run
    decode = next(c for c in CASES if c.kind == "decode" and c.pos == "BT")
    consts = compiled[(decode.name, 90)]["constexprs"]
    assert consts["T"] == 1 and consts["sq_d"] == 1 and consts["sko_d"] == 1 and consts["sp_t"] == 1
    big = next(c for c in CASES if c.kind == "big")
    assert compiled[(big.name, 90)]["signature"]["sq_b"] == "i64"
    train = next(c for c in CASES if c.kind == "train" and c.pos == "T")
    assert (
        compiled[(train.name, 90)]["signature"]["T"] == "i32" and compiled[(train.name, 90)]["constexprs"]["sq_d"] == 1
    )


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_compiles_without_spills_with_wide_accesses(compiled, case, arch):
    r = compiled[(case.name, arch)]
    s = r["summary"]
    assert s["compiled"], r["error"]
    assert s["spill_bytes"] == 0 and s["local_bytes"] == 0, f"spills/local memory: {s}"
    assert not r["sass_mem_bits"]["LDL"] and not r["sass_mem_bits"]["STL"], r["sass_mem_bits"]
    assert s["registers"] <= 128, s["registers"]
    widths = r["ptx_qk_bits"]["ld"] + r["ptx_qk_bits"]["st"]
    assert widths, "no q/k global access found in the PTX"
    if case.dtype != "float32" and case.D in (64, 128):
        assert set(widths) == {128}, f"q/k accesses of {sorted(set(widths))} bits"
        assert {int(w) for w in r["sass_mem_bits"]["STG"]} == {128}, r["sass_mem_bits"]  # JSON keys: str
