"""`make triton-aot`: compile every Triton kernel of vae_fast ahead of time for sm_80 and sm_90 —
no GPU needed — and report each compiled kernel's registers, spills and shared memory.

Representative constexpr configurations and the float32 accumulator are compiled (the largest
block of each autotuning list included, where spills would appear first); the resource usage is
read from the cubin with the ``cuobjdump`` that the triton wheel ships. Exits non-zero on a
compile failure or on any spill (local memory). One line per kernel, configuration and arch,
then a summary line.

    .venv/bin/python -m benchmarks.triton_aot [--arch 80 90] [--quiet]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated to silence its warning

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402

from vae_fast.kernels.triton import LATENT_CONFIGS, ROW_CHUNK, ROW_CONFIGS, dmol_tile, head_tile  # noqa: E402
from vae_fast.kernels.triton.dmol import dmol_kernel  # noqa: E402
from vae_fast.kernels.triton.latent import latent_backward_kernel, latent_forward_kernel  # noqa: E402
from vae_fast.kernels.triton.likelihood import (categorical_kernel, elementwise_kernel,  # noqa: E402
                                                linear_categorical_kernel, linear_elementwise_kernel,
                                                scale_rows_kernel)

F32 = tl.float32
# the row kernels' typical and largest autotuning configurations (the largest spills first)
_ROW = [(c.kwargs["BLOCK"], c.num_warps) for c in (ROW_CONFIGS[3], ROW_CONFIGS[-1])]
_LATENT = [(c.kwargs["BLOCK"], c.num_warps) for c in (LATENT_CONFIGS[2], LATENT_CONFIGS[-1])]
_RGB, _GREY = dmol_tile(3), dmol_tile(1)

# (kernel, pointer element types that are not the float32 data type, [(constexprs, num_warps), ...])
KERNELS = [
    (latent_forward_kernel, {"seed_ptr": "*i64"}, [
        (dict(PARAM=param, HAS_PRIOR=prior, HAS_EPS=False, WANT_KL_PER_DIM=True, WANT_LOG_RATIO=prior,
              DIM_MULTIPLE_OF_4=not prior, ACC=F32, BLOCK=block, CHUNK=ROW_CHUNK), warps)
        for block, warps in _LATENT for param, prior in ((0, False), (2, True))
    ]),
    (latent_backward_kernel, {"seed_ptr": "*i64"}, [
        (dict(PARAM=param, HAS_PRIOR=prior, HAS_EPS=False, HAS_GRAD_Z=True, HAS_GRAD_KL=True,
              HAS_GRAD_KL_PER_DIM=prior, WANT_PRIOR_GRAD=prior, DIM_MULTIPLE_OF_4=not prior, ACC=F32, BLOCK=block,
              CHUNK=ROW_CHUNK),
         warps)
        for block, warps in _LATENT for param, prior in ((0, False), (2, True))
    ]),
    (elementwise_kernel, {"invalid_ptr": "*i32"}, [
        (dict(LIKELIHOOD=likelihood, WANT_GRAD=True, WANT_LOGVAR_GRAD=likelihood in (2, 4), LOGVAR_GRAD_PER_ROW=False,
              ACC=F32, BLOCK=block, CHUNK=ROW_CHUNK), warps)
        for block, warps in _ROW for likelihood in (0, 1, 2, 3, 4)
    ] + [  # a learned scalar log-variance (the LDM autoencoder's): its gradient summed per row in the kernel
        (dict(LIKELIHOOD=likelihood, WANT_GRAD=True, WANT_LOGVAR_GRAD=True, LOGVAR_GRAD_PER_ROW=True, ACC=F32,
              BLOCK=_ROW[0][0], CHUNK=ROW_CHUNK), _ROW[0][1])
        for likelihood in (2, 4)
    ]),
    (categorical_kernel, {"target_ptr": "*i64", "invalid_ptr": "*i32"}, [
        (dict(WANT_GRAD=True, ACC=F32, PIXELS=16, CLASSES=256), 4),  # the launcher's 4096-element tile
    ]),
    (categorical_kernel, {"target_ptr": "*u8", "invalid_ptr": "*i32"}, [  # 8-bit pixels as targets
        (dict(WANT_GRAD=True, ACC=F32, PIXELS=16, CLASSES=256), 4),
    ]),
    (dmol_kernel, {"invalid_ptr": "*i32"}, [
        (dict(CHANNELS=channels, HAS_COEFFS=channels == 3, COEFF_TANH=channels == 3, WANT_GRAD=True,
              HALF_BIN=1.0 / 255, LOG_SCALE_MIN=-7.0, ACC=F32, MIX=mix, PIX=max(1, budget // mix)), warps)
        for channels, (budget, warps) in ((3, _RGB), (1, _GREY)) for mix in (16, 256)  # M = 10 and the maximum
    ]),
    (scale_rows_kernel, {}, [(dict(TOLERANCE=4 * 1.19e-7, BLOCK=1024), 4)]),
    (linear_elementwise_kernel, {"invalid_ptr": "*i32"}, [
        (dict(LIKELIHOOD=likelihood, HAS_BIAS=True, HAS_ROW_FACTOR=True, WANT_GRAD=True, ACC=F32,
              BLOCK_M=head_tile(block_h)[0], BLOCK_O=head_tile(block_h)[1], BLOCK_H=block_h), head_tile(block_h)[2])
        for block_h in (64, 128, 256) for likelihood in (1, 2)  # the continuous Bernoulli is the heaviest
    ]),
    (linear_categorical_kernel, {"target_ptr": "*i64", "invalid_ptr": "*i32"}, [
        (dict(HAS_BIAS=True, HAS_ROW_FACTOR=True, WANT_GRAD=True, ACC=F32, BLOCK_M=head_tile(block_h)[0],
              BLOCK_O=head_tile(block_h)[1], BLOCK_H=block_h), head_tile(block_h)[2])
        for block_h in (64, 128, 256)
    ]),
]

_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def signature(fn, constexprs: dict, pointer_types: dict) -> dict:
    """Every parameter's Triton type: constexprs, pointers (float32 data unless overridden), and
    int64 sizes and strides (the widest integer the launcher may pass)."""
    sig = {}
    for param in fn.params:
        name = param.name
        if param.is_constexpr:
            if name not in constexprs:
                raise KeyError(f"{fn.__name__}: no value for constexpr {name}")
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = pointer_types.get(name, "*fp32")
        else:
            sig[name] = "i64"
    return sig


def nvidia_tool(name: str) -> str:
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise SystemExit(f"triton-aot: {path} not found (the triton wheel ships it)")
    return str(path)


def resource_usage(kernel, arch: int) -> dict:
    """Registers, stack and local memory from the cubin (cuobjdump), spill bytes from ptxas -v on
    the same PTX (local memory also counts arrays; spills are what ptxas had to add)."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin, ptx = Path(tmp) / "k.cubin", Path(tmp) / "k.ptx"
        cubin.write_bytes(kernel.asm["cubin"])
        ptx.write_text(kernel.asm["ptx"])
        dump = subprocess.run([nvidia_tool("cuobjdump"), "--dump-resource-usage", str(cubin)], capture_output=True,
                              text=True, check=True).stdout
        target = re.search(r"\.target\s+(\w+)", kernel.asm["ptx"]).group(1)  # sm_80, sm_90a
        # the ptxas and the flags triton's make_cubin uses (triton/backends/nvidia/compiler.py)
        ptxas = get_ptxas(GPUTarget("cuda", arch, 32).arch).path
        verbose = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={target}", str(ptx),
                                  "-o", str(Path(tmp) / "o")], capture_output=True, text=True)
        if verbose.returncode != 0:
            raise RuntimeError(f"ptxas -v failed: {verbose.stderr.strip()[:300]}")
    match = _RESOURCES.search(dump)
    spills = _SPILLS.search(verbose.stdout + verbose.stderr)
    if match is None or spills is None:
        raise RuntimeError(f"no resource usage in the tools' output:\n{dump}\n{verbose.stderr}")
    regs, stack, shared, local = map(int, match.groups())
    return {"registers": regs, "stack": stack, "local": local, "spill_stores": int(spills.group(1)),
            "spill_loads": int(spills.group(2))}


def describe(constexprs: dict) -> str:
    skip = {"ACC"}
    return ",".join(f"{k}={v}" for k, v in constexprs.items() if k not in skip)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--quiet", action="store_true", help="summary line only")
    args = parser.parse_args(argv)
    compiled, failures, spills, kernels = 0, [], 0, set()
    for fn, pointer_types, configs in KERNELS:
        for constexprs, num_warps in configs:
            for arch in args.arch:
                label = f"{fn.__name__} [{describe(constexprs)}, warps={num_warps}] sm_{arch}"
                try:
                    source = triton.compiler.ASTSource(fn=fn, signature=signature(fn, constexprs, pointer_types),
                                                       constexprs=constexprs)
                    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
                    usage = resource_usage(kernel, arch)
                except Exception as exc:  # a compile failure is a result to report, then exit non-zero
                    failures.append(label)
                    print(f"FAILED {label}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                    continue
                compiled += 1
                kernels.add(fn.__name__)
                spilled = usage["spill_stores"] + usage["spill_loads"]
                spills += spilled > 0
                if not args.quiet or spilled:
                    print(f"{label}: {usage['registers']} registers, {usage['spill_stores']} B spill stores / "
                          f"{usage['spill_loads']} B loads, {usage['local']} B local, {usage['stack']} B stack, "
                          f"{kernel.metadata.shared} B shared")
    archs = ", ".join(f"sm_{a}" for a in args.arch)
    print(f"{len(kernels)} kernels ({compiled} configurations) compiled for {archs}; {spills} spills; "
          f"{len(failures)} failures")
    return 1 if failures or spills else 0


if __name__ == "__main__":
    sys.exit(main())
