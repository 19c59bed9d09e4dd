"""Device-level settings: the CPU allocator tuning and thread-count independence of matrix products."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Runs in a fresh interpreter: both settings are process-wide and read once.
PROBE = r"""
import ctypes, sys
import torch
from cifarbench.device import keep_cpu_memory


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
tuned = keep_cpu_memory() if sys.argv[1] == "tuned" else False
before = libc.mallinfo2().hblks
# 24 MiB: over glibc's default mmap threshold (128 KiB, rising by itself to the largest mapped block freed so
# far, which the imports above keep far below this), under the 32 MiB that keep_cpu_memory sets.
x = torch.empty(24 << 20, dtype=torch.uint8)
print(tuned, libc.mallinfo2().hblks - before)
"""


def probe(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    tuned, mmaps = out.split()
    return tuned, int(mmaps)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_keep_cpu_memory_keeps_step_sized_buffers_out_of_mmap() -> None:
    assert probe("default") == ("False", 1)  # glibc maps a fresh block: page faults on every step
    assert probe("tuned") == ("True", 0)  # from the heap, which is no longer handed back


GEMM = r"""
from cifarbench import runtime
runtime.configure()  # what the entry points do: MKL's strict reproducibility mode before the first product
import torch

torch.manual_seed(0)
x, y = torch.randn(100, 3072), torch.randint(0, 10, (100,))
fnn = torch.nn.Sequential(torch.nn.Linear(3072, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))  # the notebook's
grads = []
for threads in (1, 2):
    torch.set_num_threads(threads)
    fnn.zero_grad()
    torch.nn.functional.cross_entropy(fnn(x), y).backward()
    grads.append([p.grad.clone() for p in fnn.parameters()])
print(all(torch.equal(a, b) for a, b in zip(*grads)))
"""


@pytest.mark.slow
def test_matrix_product_gradients_do_not_depend_on_the_thread_count() -> None:
    # What lets `compare --jobs` workers (1 thread each) reproduce a 2-thread run of the same seed, bit for bit,
    # for models built from linear layers (MKL); oneDNN's convolution gradients have no such mode.
    def run(script: str) -> str:
        env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
        return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                              env=env).stdout.strip()

    if run(GEMM.replace("runtime.configure()", "pass")) == "True":
        pytest.skip("this machine's MKL gives thread-independent results even without the setting")
    assert run(GEMM) == "True"


def test_kernel_choice_turns_onednn_off_and_restores_it() -> None:
    import torch

    from cifarbench.device import kernel_choice

    before = torch.backends.mkldnn.enabled, torch.backends.cudnn.deterministic
    with kernel_choice(False):
        assert (torch.backends.mkldnn.enabled, torch.backends.cudnn.deterministic) == before
    with pytest.raises(ValueError), kernel_choice(True):
        assert not torch.backends.mkldnn.enabled and torch.backends.cudnn.deterministic
        raise ValueError  # restored on the way out of a failure too
    assert (torch.backends.mkldnn.enabled, torch.backends.cudnn.deterministic) == before


@pytest.mark.slow
def test_importing_cifarbench_changes_no_process_settings() -> None:
    """Settings belong to the entry points (cifarbench.runtime): a library import leaves the environment alone."""
    script = ("import os, cifarbench, cifarbench.api; "
              "print(os.environ.get('MKL_CBWR'), os.environ.get('GOMP_SPINCOUNT'))")
    env = {k: v for k, v in os.environ.items() if k not in ("MKL_CBWR", "GOMP_SPINCOUNT")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    assert done.stdout.strip() == "None None"


SPIN_AT_TORCH = r"""
import os, sys

seen = []


class Watch:  # records GOMP_SPINCOUNT when torch is first imported: libgomp reads it then
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get("GOMP_SPINCOUNT"))


sys.meta_path.insert(0, Watch())
{use}
print(seen)
"""


API, CLI = "import cifarbench as cb; cb.run_config", "from cifarbench.cli import main; main(['models'])"


@pytest.mark.slow
@pytest.mark.parametrize("use, users, expected", [(API, {}, "['10000']"), (CLI, {}, "['10000']"),
                                                  (API, {"GOMP_SPINCOUNT": "7"}, "['7']"),
                                                  (CLI, {"OMP_WAIT_POLICY": "PASSIVE"}, "[None]")])
def test_the_short_openmp_spin_is_set_before_torch_loads_unless_the_user_chose(use, users, expected) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    done = subprocess.run([sys.executable, "-c", SPIN_AT_TORCH.replace("{use}", use)], capture_output=True,
                          text=True, check=True, env={**env, **users})
    assert done.stdout.strip().splitlines()[-1] == expected
