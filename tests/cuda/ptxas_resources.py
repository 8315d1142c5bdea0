"""ptxas as a resource checker: assemble PTX for an architecture with `ptxas -v` and read
what the kernel costs (registers, static shared memory, stack frame, spills).

No Numba import here, so tests running under the CUDA simulator can use the parser.
Results are cached by the hash of (ptxas version, arch, options, PTX) in a JSON file
(NT_PTXAS_CACHE, default ~/.cache/nt/ptxas.json): an unchanged kernel is not assembled again.
"""
import hashlib
import json
import os
import re
import subprocess

ARCHS = ("sm_80", "sm_90")      # A100, H100/H200: PTX built for sm_80 assembles for both
LOCAL_BUDGET = 256              # bytes of per-thread stack frame (local memory) a kernel may use
SHARED_LIMIT = 48 * 1024        # bytes of static shared memory per block without an opt-in


def find_ptxas():
    """The ptxas binary (nvidia-cuda-nvcc wheel or a CUDA toolkit), or None."""
    try:
        from cuda.pathfinder import find_nvidia_binary_utility
        found = find_nvidia_binary_utility("ptxas")
    except Exception:  # an older cuda-pathfinder, or nothing installed
        found = None
    if found is None:
        from shutil import which
        found = which("ptxas")
    return found


def parse_ptxas(text: str) -> dict:
    """Resources of the one entry function in `ptxas -v` output: registers, static shared
    bytes, stack frame bytes (local memory), spill store and load bytes (0 when absent)."""
    def number(pattern):
        m = re.search(pattern, text)
        return int(m.group(1)) if m else 0
    return {"registers": number(r"Used (\d+) registers"), "shared": number(r"(\d+) bytes smem"),
            "stack": number(r"(\d+) bytes stack frame"), "spill_stores": number(r"(\d+) bytes spill stores"),
            "spill_loads": number(r"(\d+) bytes spill loads")}


def problems(res: dict) -> list:
    """Why these resources fail the check (an empty list: they pass)."""
    found = [f"ptxas: {res['error']}"] if "error" in res else []
    if res["spill_stores"] or res["spill_loads"]:
        found.append(f"spills registers ({res['spill_stores']} B stored, {res['spill_loads']} B loaded)")
    if res["stack"] > LOCAL_BUDGET:
        found.append(f"{res['stack']} B stack frame > {LOCAL_BUDGET} B local-memory budget")
    if res["shared"] > SHARED_LIMIT:
        found.append(f"{res['shared']} B static shared memory > {SHARED_LIMIT} B")
    return found


class Ptxas:
    """Runs `ptxas -v` on PTX text, remembering results by the hash of (ptxas, arch,
    options, PTX) in a JSON file so an unchanged kernel is not assembled again."""

    def __init__(self, path, cache_file=None):
        self.path = path
        self.version = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
        self.cache_file = cache_file or os.environ.get("NT_PTXAS_CACHE") or os.path.join(
            os.path.expanduser("~"), ".cache", "nt", "ptxas.json")
        try:
            with open(self.cache_file) as f:
                self.cache = json.load(f)
        except (OSError, ValueError):
            self.cache = {}

    def resources(self, ptx: str, arch: str, options=()) -> dict:
        key = hashlib.sha256("\0".join([self.version, arch, *options, ptx]).encode()).hexdigest()
        if key not in self.cache:
            run = subprocess.run([self.path, "-v", f"-arch={arch}", *options, "-o", os.devnull, "-"],
                                 input=ptx, capture_output=True, text=True)
            res = parse_ptxas(run.stderr + run.stdout)
            if run.returncode != 0:  # e.g. "uses too much shared data": a failure to report
                res["error"] = " ".join(line for line in run.stderr.splitlines() if "error" in line)[:500]
            self.cache[key] = res
        return self.cache[key]

    def save(self):
        os.makedirs(os.path.dirname(self.cache_file), exist_ok=True)
        tmp = self.cache_file + f".{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.cache, f)
        os.replace(tmp, self.cache_file)
