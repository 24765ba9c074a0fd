"""kiln's native C kernels (kiln.nn.native*) against the PyTorch path: outputs and gradients over widths and
thread counts, and when a kernel is reached, built and refused."""

import copy
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kiln
from kiln.config import load_config
from kiln.hardware import parse_cpu_flags
from kiln.nn import build_model, native, native_attention, native_lstm, native_norm
from kiln.nn.blocks.adapters import RowsToSequence
from kiln.nn.blocks.conv import Conv2d, MaxPool2d
from kiln.nn.blocks.recurrent import LSTM
from kiln.nn.fuse import ConvPool, NativeConvPool, NativeRecurrent, fuse

WIDTHS = [8, 12, 32, 256]  # filters / units / model width: one vector, a partial one, several, the largest
THREADS = [1, 2, 3]  # 3 on a 2-core machine: more threads than cores, and a count that does not divide batches
EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def kernel_cache(tmp_path_factory):
    """One kernel cache and one loader for the module, so each shape is compiled once (0.2-0.3 s each)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KILN_CACHE", str(tmp_path_factory.mktemp("kcache")))
        mp.setenv("KILN_NATIVE", "1")
        mp.setattr(native, "_loaded", {})
        yield


@pytest.fixture(params=THREADS, ids=lambda n: f"{n}threads")
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.fixture
def fresh_cache(monkeypatch, tmp_path):
    """An empty kernel cache and a process-fresh loader."""
    monkeypatch.setenv("KILN_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_loaded", {})
    return tmp_path / "native"


def assert_close(got, fp32, exact, name):
    """The kernel's float32 result ``got`` is at most twice as far from the float64 result ``exact`` as PyTorch's
    float32 result ``fp32`` is, plus 8 float32 ulps of the largest value: the kernels add in another order (per
    thread, in vectors of eight) and their exp is within 2 ulp. Measured here: at most 3.4 times PyTorch's error
    and 11 ulps of the largest value. A wrong index or a missing term is off by a good part of the values; even
    the exp polynomial's x^2 coefficient changed by 1e-4 fails the LSTM comparisons."""
    err = (got.double() - exact).abs().max().item()
    allowed = 2 * (fp32.double() - exact).abs().max().item() + 8 * EPS32 * exact.abs().max().item()
    assert err <= allowed, f"{name}: {err:.3g} from the float64 result, more than {allowed:.3g}"


def _grads(out, g, tensors):
    return torch.autograd.grad((out * g).sum(), tensors)


def _check_module(plain, fused, x, name):
    """fused (float32, kernel) against plain in float32 and in float64: output, parameter and input gradients."""
    exact = copy.deepcopy(plain).double()
    results = []
    for model, dtype in ((fused, torch.float32), (plain, torch.float32), (exact, torch.float64)):
        xi = x.to(dtype).requires_grad_(x.requires_grad)
        out = model(xi)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
        params = list(model.parameters()) + ([xi] if x.requires_grad else [])
        results.append([out.detach(), *_grads(out, g, params)])
    names = ["output"] + [n for n, _ in plain.named_parameters()] + (["input"] if x.requires_grad else [])
    for n, got, fp32, ex in zip(names, *results, strict=True):
        assert_close(got, fp32, ex, f"{name} {n}")


@pytest.mark.parametrize("filters", WIDTHS)
def test_convpool_matches_pytorch(kernel_cache, threads, filters):
    torch.manual_seed(0)
    plain = build_model([Conv2d(filters=filters, activation="relu"), MaxPool2d(), RowsToSequence()], (1, 28, 28))
    fused = copy.deepcopy(plain)
    fuse(fused)
    assert isinstance(fused.blocks[0], ConvPool)
    assert native.load(1, 3, 3, filters, 2)[0] is not None
    _check_module(plain, fused, torch.rand(6, 1, 28, 28), f"convpool{filters}")


@pytest.mark.parametrize("units", WIDTHS)
def test_lstm_matches_pytorch(kernel_cache, threads, units):
    torch.manual_seed(0)
    plain = build_model([LSTM(units=units)], (9, 7))
    fused = copy.deepcopy(plain)
    fuse(fused)
    assert isinstance(fused.blocks[0], NativeRecurrent) and native_lstm.load(units)[0] is not None
    _check_module(plain, fused, (torch.randn(5, 9, 7) * 2).requires_grad_(), f"lstm{units}")


def _attention(qkv, heads):  # (B, T, 3C) -> (B, T, C), as SelfAttention.mix computes it
    b, t, c3 = qkv.shape
    q, k, v = (z.view(b, t, heads, c3 // 3 // heads).transpose(1, 2) for z in qkv.split(c3 // 3, dim=2))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, c3 // 3)


@pytest.mark.parametrize(("width", "steps"), [(w, 13) for w in WIDTHS] + [(32, native_attention.MAX_STEPS)])
def test_attention_matches_pytorch(kernel_cache, threads, width, steps):
    heads = 2
    qkv = torch.randn(5, steps, 3 * width, generator=torch.Generator().manual_seed(0)) * 2
    assert native_attention.applies(qkv, heads, 0.0, True)
    g = torch.randn(5, steps, width, generator=torch.Generator().manual_seed(1))
    results = []
    for fn, dtype in ((native_attention.NativeAttention.apply, torch.float32), (_attention, torch.float32),
                      (_attention, torch.float64)):
        x = qkv.to(dtype).requires_grad_()
        out = fn(x, heads)
        results.append([out.detach(), *_grads(out, g.to(dtype), [x])])
    for n, got, fp32, ex in zip(["output", "qkv"], *results, strict=True):
        assert_close(got, fp32, ex, f"attention{width}x{steps} {n}")


@pytest.mark.parametrize("width", WIDTHS)
def test_add_norm_matches_pytorch(kernel_cache, threads, width):
    gen = torch.Generator().manual_seed(0)
    x, y, g = (torch.randn(77, width, generator=gen) * 2 for _ in range(3))  # 77 rows: not a multiple of 4
    weight, bias = torch.rand(width, generator=gen) + 0.5, torch.rand(width, generator=gen) - 0.5
    eps = 1e-5
    assert native_norm.load(width, eps)[0] is not None
    results = []
    for native_path, dtype in ((True, torch.float32), (False, torch.float32), (False, torch.float64)):
        ts = [t.to(dtype).requires_grad_() for t in (x, y, weight, bias)]
        out = (native_norm.AddNorm.apply(*ts, eps) if native_path
               else F.layer_norm(ts[0] + ts[1], (width,), ts[2], ts[3], eps))
        results.append([out.detach(), *_grads(out, g.to(dtype), ts)])
    for n, got, fp32, ex in zip(["output", "x", "y", "weight", "bias"], *results, strict=True):
        assert_close(got, fp32, ex, f"addnorm{width} {n}")


def _seed_model():
    config = load_config(Path(__file__).parents[1] / "examples" / "mnist_seed.yaml")
    torch.manual_seed(0)
    return build_model(config.blocks, (1, 28, 28))


def test_kiln_native_0_takes_the_pytorch_path_and_gives_the_plain_results(fresh_cache, monkeypatch, threads):
    monkeypatch.setenv("KILN_NATIVE", "0")
    plain = _seed_model()
    fused = copy.deepcopy(plain)
    fuse(fused)
    _check_module(plain, fused, torch.rand(6, 1, 28, 28), "seed model, KILN_NATIVE=0")
    assert len(native._loaded) == 4 and all(lib is None for lib, _ in native._loaded.values())  # all were asked
    assert not fresh_cache.exists()  # nothing was built


# A child process in which OpenMP grants one thread (OMP_THREAD_LIMIT=1) while kiln asks for three, so that the
# kernels' per-thread gradient buffers are written by fewer threads than were asked for. It computes only the
# kernels' gradients: PyTorch's own oneDNN convolution hangs in that setting.
OMP_LIMITED = """
import sys, torch
from kiln.nn.fuse import NativeConvPool
from kiln.nn.native_norm import AddNorm
torch.set_num_threads(3)
(x, w, b, g), (xn, yn, wn, bn, gn) = torch.load(sys.argv[1])
for t in (w, b, wn, bn):
    t.requires_grad_()
conv = torch.autograd.grad((NativeConvPool.apply(x, w, b, 2, True) * g).sum(), (w, b))
norm = torch.autograd.grad((AddNorm.apply(xn, yn, wn, bn, 1e-5) * gn).sum(), (wn, bn))
torch.save([*conv, *norm], sys.argv[2])
"""


def _child(code, *args, **env):
    """Run ``code`` in a child Python process that imports this kiln, with ``env`` added to the environment."""
    src = str(Path(kiln.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]), **env}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, env=env)


def test_gradients_are_right_when_openmp_grants_fewer_threads(kernel_cache, tmp_path):
    gen = torch.Generator().manual_seed(0)
    conv_in = [torch.rand(16, 1, 28, 28, generator=gen), torch.randn(32, 1, 3, 3, generator=gen),
               torch.randn(32, generator=gen), torch.randn(16, 13, 13, 32, generator=gen)]
    norm_in = [torch.randn(40, 50, generator=gen), torch.randn(40, 50, generator=gen),
               torch.rand(50, generator=gen) + 0.5, torch.rand(50, generator=gen), torch.randn(40, 50, generator=gen)]
    torch.save([conv_in, norm_in], tmp_path / "in.pt")
    child = _child(OMP_LIMITED, tmp_path / "in.pt", tmp_path / "out.pt", OMP_THREAD_LIMIT="1")
    assert child.returncode == 0, child.stderr
    got = torch.load(tmp_path / "out.pt")
    refs = []
    for dtype in (torch.float32, torch.float64):
        x, w, b, g = (t.to(dtype) for t in conv_in)
        xn, yn, wn, bn, gn = (t.to(dtype) for t in norm_in)
        for t in (w, b, wn, bn):
            t.requires_grad_()
        out = torch.relu(F.max_pool2d(F.conv2d(x, w, b), 2)).permute(0, 2, 3, 1)  # channels-last, as the kernel's
        refs.append([*_grads(out, g, (w, b)), *_grads(F.layer_norm(xn + yn, (50,), wn, bn, 1e-5), gn, (wn, bn))])
    for name, a, fp32, exact in zip(["conv weight", "conv bias", "norm weight", "norm bias"], got, *refs, strict=True):
        assert_close(a, fp32, exact, name)


def test_under_cpu_autocast_no_kernel_applies_and_the_lstm_takes_pytorch(kernel_cache):
    torch.manual_seed(0)
    plain = build_model([LSTM(units=16)], (9, 7))
    fused = copy.deepcopy(plain)
    fuse(fused)
    x = torch.randn(5, 9, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(fused(x), plain(x))  # the PyTorch LSTM, under autocast in both
        assert not native_lstm.applies(x, fused.blocks[0].rnn)
        assert not native_attention.applies(torch.randn(2, 13, 48), 2, 0.0, True)
        assert not native_norm.applies(torch.randn(2, 13, 16), torch.nn.LayerNorm(16))


def test_kernels_refuse_buffers_they_cannot_read(kernel_cache):
    """A bf16 buffer reaching a kernel is refused with the reason, never read as float32."""
    x, whh = torch.randn(3, 5, 32, dtype=torch.bfloat16), torch.randn(32, 8)
    with pytest.raises(TypeError, match="bfloat16"):
        native_lstm.Recurrence.apply(x, whh)
    with pytest.raises(TypeError, match="bfloat16"):
        native_attention.NativeAttention.apply(torch.randn(3, 13, 24, dtype=torch.bfloat16), 2)
    w = torch.ones(8)
    with pytest.raises(TypeError, match="bfloat16"):
        native_norm.AddNorm.apply(torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(4, 8), w, w, 1e-5)
    with pytest.raises(TypeError, match="bfloat16"):
        NativeConvPool.apply(torch.rand(2, 1, 28, 28, dtype=torch.bfloat16), torch.randn(8, 1, 3, 3), None, 2, True)
    lib, _ = native_norm.load(8, 1e-5)
    strided = torch.randn(8, 4).t()
    with pytest.raises(TypeError, match="contiguous"):
        lib.addnorm_forward(strided, strided, w, w, torch.empty(4, 8), torch.empty(4, 8), torch.empty(4), 4, 1)


def test_fuse_compiles_nothing_until_a_kernel_is_used(fresh_cache, monkeypatch):
    """Loading a run for serving fuses its model; a kernel is built at first real use only."""
    compiles = []
    run = subprocess.run
    monkeypatch.setattr(native.subprocess, "run", lambda *a, **k: compiles.append(a) or run(*a, **k))
    model = _seed_model()
    assert len(fuse(model)) == 4
    assert compiles == [] and not list(fresh_cache.glob("*.so"))
    model(torch.rand(2, 1, 28, 28)).sum().backward()  # a training step: now each kernel is built
    assert len(compiles) == 4 and len(list(fresh_cache.glob("*.so"))) == 4


ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU part\t: 0xd0c

"""
X86_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu vme sse sse2 avx avx2 fma avx512f avx512_bf16
bugs\t\t: sysret_ss_attrs
"""


def test_cpu_flags_are_read_on_arm_and_x86():
    assert {"asimd", "asimddp", "atomics"} <= parse_cpu_flags(ARM_CPUINFO)
    assert {"avx2", "avx512_bf16"} <= parse_cpu_flags(X86_CPUINFO)
    assert "sysret_ss_attrs" not in parse_cpu_flags(X86_CPUINFO)
    assert parse_cpu_flags("") == frozenset()


def _built_kernel(cache: Path) -> Path:
    """The file of the convpool kernel for 8 filters, built into ``cache``."""
    assert native.load(1, 3, 3, 8, 2)[0] is not None
    (path,) = cache.glob("convpool-*.so")
    return path


def _replace(target: Path, content: bytes) -> None:
    """A new file with ``content`` in place of ``target``. Not written in place: this process has the library
    loaded, and truncating its pages would kill it with SIGBUS."""
    new = target.with_name("replacement")
    new.write_bytes(content)
    os.replace(new, target)


# A fresh process that loads that kernel and runs it, as `kiln train` or `kiln predict` would.
LOAD_AND_RUN = """
import torch
from kiln.nn import native
lib, how = native.load(1, 3, 3, 8, 2)
print(how)
out = torch.empty(2, 13, 13, 8)
lib.convpool_forward(torch.rand(2, 1, 28, 28), torch.randn(9, 8), torch.zeros(8), out,
                     torch.empty(out.shape, dtype=torch.uint8), 2, 28, 28, 1, 1)
"""

PLANTED = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen(getenv("KILN_TEST_MARKER"), "w");
    if (f) fclose(f);
}
"""


def test_a_planted_library_is_never_loaded_and_the_kernel_is_rebuilt(fresh_cache, tmp_path):
    target = _built_kernel(fresh_cache)
    built = target.read_bytes()
    (tmp_path / "planted.c").write_text(PLANTED)
    subprocess.run(["gcc", "-shared", "-fPIC", tmp_path / "planted.c", "-o", tmp_path / "planted.so"], check=True)
    _replace(target, (tmp_path / "planted.so").read_bytes())
    marker = tmp_path / "marker"
    child = _child(LOAD_AND_RUN, KILN_TEST_MARKER=str(marker))
    assert not marker.exists(), "the planted library's constructor ran"
    assert child.returncode == 0, child.stderr
    assert "native C kernel" in child.stdout and target.read_bytes() == built


@pytest.mark.parametrize("damage", ["empty", "garbage", "truncated"])
def test_a_damaged_library_is_rebuilt_and_nothing_dies(fresh_cache, damage):
    target = _built_kernel(fresh_cache)
    built = target.read_bytes()
    _replace(target, {"empty": b"", "garbage": os.urandom(len(built)), "truncated": built[: len(built) // 2]}[damage])
    child = _child(LOAD_AND_RUN)
    assert child.returncode == 0, f"exit {child.returncode}: {child.stderr}"  # a truncated one gave SIGBUS (-7)
    assert "native C kernel" in child.stdout and target.read_bytes() == built


@pytest.mark.parametrize("mode", [0o775, 0o757], ids=["group-writable", "others-writable"])
def test_a_cache_folder_others_can_write_is_refused(fresh_cache, mode):
    fresh_cache.mkdir(parents=True)
    fresh_cache.chmod(mode)
    with pytest.warns(RuntimeWarning, match="writable by group or others"):
        lib, how = native.load(1, 3, 3, 8, 2)
    assert lib is None and f"chmod go-w {fresh_cache}" in how  # the PyTorch path, and how to fix it
    assert list(fresh_cache.iterdir()) == []  # nothing built into it, nothing loaded from it


@pytest.mark.skipif(os.geteuid() != 0, reason="giving the folder to another user needs root")
def test_a_cache_folder_of_another_user_is_refused(fresh_cache):
    fresh_cache.mkdir(parents=True, mode=0o700)
    os.chown(fresh_cache, 65534, 65534)
    with pytest.warns(RuntimeWarning, match="belongs to another user"):
        assert native.load(1, 3, 3, 8, 2)[0] is None


def test_the_cache_folder_is_created_private_with_a_record_per_library(fresh_cache):
    target = _built_kernel(fresh_cache)
    assert fresh_cache.stat().st_mode & 0o777 == 0o700
    record = target.with_name(target.name + ".sha256").read_text()
    assert record == hashlib.sha256(target.read_bytes()).hexdigest()


def test_a_checked_library_is_loaded_again_without_compiling(fresh_cache, monkeypatch):
    _built_kernel(fresh_cache)
    monkeypatch.setattr(native, "_loaded", {})  # as in a new process
    monkeypatch.setattr(native.subprocess, "run", lambda *a, **k: pytest.fail("compiled again"))
    assert native.load(1, 3, 3, 8, 2)[0] is not None
