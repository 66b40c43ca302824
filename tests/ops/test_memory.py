"""Peak-memory checks: peak resident set of a fresh subprocess minus its resident set just before the call."""

import json
import os
import subprocess
import sys
import textwrap

SCRIPT_PREAMBLE = """
import json, resource, torch
torch.manual_seed(0)
torch.set_num_threads(2)
def peak_bytes():
    # VmHWM is this process's own peak; ru_maxrss would start at the parent's resident set, which a
    # child inherits through fork and keeps across exec.
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024
def current_bytes():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()
"""


def _measure(body: str) -> dict:
    script = SCRIPT_PREAMBLE + textwrap.dedent(body)
    # A fixed mmap threshold makes glibc return every large buffer to the system when it is freed;
    # its default dynamic threshold keeps freed buffers in the heap and inflates the resident set.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_warmup_kl_peak_below_score_matrix():
    result = _measure(
        """
        from dsa.ops.indexer_loss import warmup_kl_blockwise
        T, H, HKV, D, HI, DI = 8192, 2, 1, 16, 2, 16
        q, k = torch.randn(1, T, H, D), torch.randn(1, T, HKV, D)
        q_idx = torch.randn(1, T, HI, DI, requires_grad=True)
        k_idx = torch.randn(1, T, DI, requires_grad=True)
        w = torch.randn(1, T, HI, requires_grad=True)
        warmup_kl_blockwise(q[:, :64], k[:, :64], q_idx[:, :64], k_idx[:, :64], w[:, :64]).backward()
        before = current_bytes()
        warmup_kl_blockwise(q, k, q_idx, k_idx, w, chunk_elements=1 << 22).backward()
        print(json.dumps({"growth": peak_bytes() - before, "matrix": T * T * 4}))
        """
    )
    print(f"warm-up KL peak growth {result['growth'] / 2**20:.1f} MiB; one [T, T] fp32 matrix {result['matrix'] / 2**20:.0f} MiB")
    assert result["growth"] < result["matrix"]


def test_sparse_attention_peak_independent_of_t_times_s():
    result = _measure(
        """
        from dsa.ops.sparse_attention import sparse_attention_torch
        T, H, HKV, D, K = 16384, 2, 1, 16, 64
        q = torch.randn(1, T, H, D, requires_grad=True)
        k = torch.randn(1, T, HKV, D, requires_grad=True)
        v = torch.randn(1, T, HKV, D, requires_grad=True)
        positions = torch.arange(T).view(1, T, 1)
        indices = (positions - torch.arange(K).view(1, 1, K) * 37)
        indices = torch.where(indices >= 0, indices, -1)
        sparse_attention_torch(q[:, :64], k[:, :64], v[:, :64], indices[:, :64].clamp(max=63)).sum().backward()
        before = current_bytes()
        sparse_attention_torch(q, k, v, indices, chunk_size=256).sum().backward()
        print(json.dumps({"growth": peak_bytes() - before, "matrix": T * T * 4}))
        """
    )
    print(f"sparse attention peak growth {result['growth'] / 2**20:.1f} MiB; one [T, S] fp32 matrix {result['matrix'] / 2**20:.0f} MiB")
    assert result["growth"] < result["matrix"] / 8
