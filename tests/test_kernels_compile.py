"""Every launched Triton kernel of kernels/ compiled for sm_90, without a GPU.

The CPU tests run the kernels through the interpreter (TRITON_INTERPRET=1), which skips most of the compiler's type
checks (a loop-carried variable that changes dtype runs there): a kernel can pass all of them and still fail to
compile on a GPU. So each launched kernel is compiled here by Triton's frontend and
its bundled ptxas for GPUTarget("cuda", 90, 32), with the argument types, constexprs and num_warps its launcher
passes: every dtype the launcher accepts, each constexpr flag that changes control flow, and the block sizes the
launcher computes for typical shapes. Pointers are typed as the tensors the launcher passes, Python ints as i32 (i64
where they may pass 2³¹), Python floats as fp32 unless the parameter is annotated (tl.float64 → fp64). Variants an
op declares too new for the installed Triton (register_op's triton_needs: float64 tl.dot before 3.5) are left out
and counted, as the dispatcher refuses them there.

One subprocess (TRITON_INTERPRET=0) runs this file as a script and compiles the cases on a small process pool;
helpers called from a kernel compile with it, so only launched kernels are listed."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest

WARPS = 4  # no launcher here passes num_warps: Triton's default


def _cases():
    """(label, kernel, signature, constexprs, num_warps) for every launched kernel and variant."""
    import torch
    import triton
    import triton.language as tl

    from kexue_fast import _dispatch
    from kexue_fast.hsic import api as hsic_api
    from kexue_fast.kernels import hsic, iresnet, jacobi, jose, langevin, power_iteration, som
    from kexue_fast.ortho import som as som_api

    ptr = {tl.float16: "*fp16", tl.bfloat16: "*bf16", tl.float32: "*fp32", tl.float64: "*fp64"}
    cases = []

    def case(label, kernel, types, consts, num_warps=WARPS, needs=None, num_stages=None):
        """needs: (op, torch dtype) whose Triton floor (register_op's triton_needs) this variant stands on: left out
        under an older Triton, where the dispatcher refuses it."""
        # every parameter typed exactly once: an argument added to a kernel fails here instead of going unchecked
        missing = [a for a in kernel.arg_names if a not in consts and a not in types]
        extra = set(types) - set(kernel.arg_names)
        assert not missing and not extra, (label, missing, extra)
        if needs is not None:
            op, dtype = needs
            floor = _dispatch._OPS[op].triton_needs[dtype][0]  # KeyError: the op does not declare it
            if _dispatch.triton_version() < floor:
                _SKIPPED.append(f"{label} {consts}")
                return
        sig = {a: "constexpr" if a in consts else types[a] for a in kernel.arg_names}
        options = {"num_warps": num_warps} if num_stages is None else {"num_warps": num_warps, "num_stages": num_stages}
        cases.append((f"{label} {consts}", kernel, sig, consts, options))

    # hsic: float32 [n, d] rows (delta labels: [n, 1]), float64 outputs and coefficients; the scales are Python floats
    # (fp32). _config: BDX, BDY = max(16, next_pow2(d)), BLOCK 64 if both <= 64 else 32. Codes 0 gaussian, 1 laplace,
    # 2 imq, 3 linear, 4 delta: each on each side.
    f32 = "*fp32"
    for kx, ky, bdx, bdy in ((0, 4, 16, 16), (1, 2, 128, 16), (3, 3, 64, 32), (4, 0, 16, 16), (2, 1, 16, 128)):
        c = {"KX": kx, "KY": ky, "BLOCK": 64 if max(bdx, bdy) <= 64 else 32, "BDX": bdx, "BDY": bdy}
        t = {"x_ptr": f32, "y_ptr": f32, "out_ptr": "*fp64", "n": "i32", "DX": "i32", "DY": "i32", "scale_x": "fp32",
             "scale_y": "fp32"}  # fmt: skip
        case("hsic stats", hsic._hsic_stats_kernel, t, c)
    # a delta side never needs its gradient (need_x = need_x and kind_x != "delta"); laplace is launched by
    # hsic_grads although kexue_fast.hsic.tiled sends laplace backwards to torch
    for kx, ky, nx, ny, bdx, bdy in (
        (0, 0, True, True, 16, 16),
        (3, 4, True, False, 64, 16),
        (4, 2, False, True, 16, 128),
        (2, 3, True, True, 128, 32),
        (1, 1, True, True, 32, 16),
    ):
        c = {"KX": kx, "KY": ky, "NEED_X": nx, "NEED_Y": ny, "BLOCK": 64 if max(bdx, bdy) <= 64 else 32, "BDX": bdx,
             "BDY": bdy}  # fmt: skip
        t = {"x_ptr": f32, "y_ptr": f32, "uk_ptr": "*fp64", "ul_ptr": "*fp64", "coef_ptr": "*fp64",
             "gx_ptr": "*fp64", "gy_ptr": "*fp64", "n": "i32", "DX": "i32", "DY": "i32", "scale_x": "fp32",
             "scale_y": "fp32"}  # fmt: skip
        case("hsic grad", hsic._hsic_grad_kernel, t, c, needs=(hsic_api.OP, torch.float32))  # float64 tl.dot

    # iresnet: float32 only; BLOCK_D = max(16, next_pow2(D)) <= 128, BLOCK_B 32 (BLOCK_D <= 64) else 16, BLOCK_H 32
    k = iresnet._dense_residual_fwd_kernel
    for act, block_d in ((0, 16), (1, 64), (2, 128)):
        c = {"ACT": act, "BLOCK_B": 32 if block_d <= 64 else 16, "BLOCK_D": block_d, "BLOCK_H": 32}
        t = {a: f32 for a in k.arg_names if a.endswith("_ptr")}
        case("iresnet fwd", k, {**t, "B": "i32", "D": "i32", "H": "i32"}, c)

    # jacobi: float32 and float64, with and without mp; n = numel, which may pass 2³¹ (i64)
    k = jacobi._jacobi_kernel
    for dt, has_mp, n in ((tl.float32, False, "i32"), (tl.float32, True, "i32"), (tl.float32, False, "i64"),
                          (tl.float64, False, "i32"), (tl.float64, True, "i32")):  # fmt: skip
        t = {a: ptr[dt] for a in k.arg_names if a.endswith("_ptr")}
        case(f"jacobi {dt} n:{n}", k, {**t, "n": n}, {"BLOCK": jacobi.BLOCK, "LEVELS": jacobi.LEVELS, "HAS_MP": has_mp})

    # langevin: four storage dtypes, coefficients in the compute dtype. Drawn noise: the int64 seed, z_ptr = x and
    # n <= MAX_RNG_ELEMENTS (i32); given noise: seed None (the coef tensor is passed) and n may pass 2³¹ (i64)
    for dt in (tl.float16, tl.bfloat16, tl.float32, tl.float64):
        coef = ptr[tl.float64 if dt == tl.float64 else tl.float32]
        for has_noise in (False, True):
            t = {"x_ptr": ptr[dt], "s_ptr": ptr[dt], "z_ptr": ptr[dt], "coef_ptr": coef,
                 "seed_ptr": coef if has_noise else "*i64", "out_ptr": ptr[dt], "n": "i64" if has_noise else "i32",
                 "step": "i32"}  # fmt: skip
            case(
                f"langevin {dt}", langevin._langevin_update_kernel, t, {"HAS_NOISE": has_noise, "BLOCK": langevin.BLOCK}
            )

    # jose: float32 tables (the trainer) and float64 (also accepted); int64 index vectors (centre: int64 words, or ui
    # passed in its place); alpha, margin annotated fp64. Per dtype every (RULE, MOVE_WORDS) pair, HAS_CW both ways;
    # BLOCK_T = _block_t(dim), BLOCK_D = next_pow2(dim) for dim 100 (32, 128) and 300 (8, 512); float64 at dim 300
    # only (float64 [32, 128] tiles take 2-7 s each to compile, [8, 512] tiles under 1.5 s)
    i64 = "*i64"
    for dt, dims in ((tl.float32, (100, 300, 300, 100)), (tl.float64, (300, 300, 300, 300))):
        p = ptr[dt]
        for (rule, move, has_cw), dim in zip(((0, True, True), (1, True, False), (0, False, False), (1, False, True)),
                                             dims):  # fmt: skip
            c = {"RULE": rule, "MOVE_WORDS": move, "HAS_CW": has_cw, "BLOCK_T": jose._block_t(dim),
                 "BLOCK_D": triton.next_power_of_2(dim)}  # fmt: skip
            t = {"u_ptr": p, "v_ptr": p, "du_ptr": p, "dv_ptr": p, "ui_ptr": i64, "vi_ptr": i64, "ni_ptr": i64,
                 "cw_ptr": i64, "loss_ptr": p, "n": "i32", "D": "i32", "alpha": "fp64", "margin": "fp64"}  # fmt: skip
            case(f"jose separate {dt}", jose._jose_separate_step_kernel, t, c)
            case(f"jose joint {dt}", jose._jose_joint_step_kernel, {**t, "d_ptr": p, "dd_ptr": p, "di_ptr": i64}, c)
        c = {"BLOCK_R": jose._block_t(100), "BLOCK_D": 128}
        t = {"x_ptr": p, "dx_ptr": p, "rows_ptr": i64, "n": "i32", "D": "i32"}
        case(f"jose retract {dt}", jose._jose_retract_kernel, t, c)
        case(f"jose retract stage {dt}", jose._jose_retract_stage_kernel, {**t, "stage_ptr": p}, c)
        case(f"jose retract commit {dt}", jose._jose_retract_commit_kernel, {**t, "stage_ptr": p}, c)

    # power iteration: int64 tables (pointers, shapes, offsets, work); tiny a Python float (fp32), eps annotated
    # fp64. BLOCK_M from _block_rows (32, 16, 8 or 4 on a GPU), BLOCK_N = max(16, min(128, next_pow2(max n))),
    # BLOCK = max(16, min(1024, next_pow2(max(max n, max m))))
    tables = {a: i64 for a in ("w_ptrs", "u_ptrs", "v_ptrs", "rows_ptr", "cols_ptr", "v_off_ptr", "work_mat_ptr",
                               "work_row_ptr")}  # fmt: skip
    for dt, block_m, block_n, block_f in ((tl.float32, 32, 128, 1024), (tl.float64, 8, 128, 512),
                                          (tl.float32, 4, 16, 16)):  # fmt: skip
        k = power_iteration._power_iteration_step_kernel
        t = {**tables, "v_in": ptr[dt], "v_acc": ptr[dt], "v_clear": ptr[dt], "tiny": "fp32"}
        case(f"power step {dt}", k, {a: t[a] for a in k.arg_names if a in t},
             {"DTYPE": dt, "BLOCK_M": block_m, "BLOCK_N": block_n})  # fmt: skip
        k = power_iteration._power_iteration_finalize_kernel
        t = {**tables, "v_acc": ptr[dt], "v_prev": ptr[dt], "sigma_ptr": ptr[dt], "eps": "fp64", "tiny": "fp32"}
        case(f"power finalize {dt}", k, {a: t[a] for a in k.arg_names if a in t}, {"DTYPE": dt, "BLOCK": block_f})

    # som: layer outputs of each dtype (ACC float64 for float64, else float32: half inputs compile their own
    # instances), int64 tables, gamma and the lambdas annotated fp64; each row-blocking mode (0 dense, 1 spatial,
    # 2 strided) at the BR its launcher picks on CUDA (64, 32 for float64, down to 16 for small spatial layers, up to
    # 256 with GRAM_ROWS / GRAD_ROWS raised); BC the computed tile width (16 to 64), BCS the slots' (wider for a narrow
    # single-tile layer beside wide ones); tf32 dots where torch allows them, tf32x3 (GRAM_DOTS, GRAD_DOTS)
    # otherwise; DIAG (the Gram launch's pairs all diagonal) both ways, and with PREFETCH; the grad kernel with and
    # without its one-tile epilogue (unscaled once), one-tile also PERSIST; the finish kernel is float64 only, on
    # FINISH_WARPS warps
    t32, t64 = tl.float32, tl.float64
    configs = ((t32, t32, 64, 64, 64, "ieee", 1), (t32, t32, 16, 32, 64, "tf32", 1), (t32, t32, 64, 32, 64, "ieee", 2),
               (t32, t32, 64, 16, 16, "ieee", 0), (t64, t64, 32, 64, 64, "ieee", 0), (t64, t64, 32, 32, 64, "ieee", 1),
               (t64, t64, 32, 64, 64, "ieee", 2), (tl.bfloat16, t32, 64, 64, 64, "ieee", 1),
               (tl.float16, t32, 64, 32, 64, "ieee", 0), (t32, t32, 256, 32, 64, "tf32x3", 1),
               (t32, t32, 128, 64, 64, "tf32x3", 0), (tl.bfloat16, t32, 64, 16, 64, "tf32x3", 2),
               (tl.float16, t32, 64, 32, 64, "tf32x3", 1))  # fmt: skip
    for n, (dt, acc, br, bc, bcs, prec, mode) in enumerate(configs):
        common = {"DTYPE": dt, "ACC": acc, "PREC": prec, "BR": br, "BC": bc, "MODE": mode}
        t = {"y_ptrs": i64, "meta_ptr": i64, "work_ptr": i64, "part_ptr": ptr[acc], "gamma_arg": "fp64", "R": "i32"}
        # float64 tl.dot; bfloat16's tf32x3 dots (3.0 and 3.1 abort on the grad kernel's): both declared by the op
        needs = (som_api.OP, {tl.float64: torch.float64, tl.bfloat16: torch.bfloat16}[dt]) \
            if dt in (tl.float64, tl.bfloat16) else None  # fmt: skip
        # DIAG: every pair of the launch a diagonal tile; the Gram on its launcher's pipeline stages (GRAM_STAGES)
        # PREFETCH (GRAM_PREFETCH) only changes diagonal launches: both ways there
        for diag, prefetch in ((False, False), (True, False), (True, True)) if n < 2 or n == 5 or prec == "tf32x3" \
                else ((False, False),):  # fmt: skip
            case(f"som gram {dt}", som._som_gram_kernel, t, {**common, "BCS": bcs, "DIAG": diag, "PREFETCH": prefetch},
                 som.GRAM_WARPS, needs, num_stages=som.GRAM_STAGES)  # fmt: skip
        t = {"y_ptrs": i64, "meta_ptr": i64, "a_ptr": "*fp64", "scale_ptr": "*fp64", "dy_ptr": ptr[dt],
             "gamma_arg": "fp64", "KP": "i32", "L": "i32", "TOTAL": "i32", "SCALE_STRIDE": "i32"}  # fmt: skip
        variants = ((True, False, False), (True, True, False), (True, True, True))  # PERSIST only with ONE_TILE
        for scaled, one_tile, persist in variants + (((False, False, False),) if n == 0 else ()):
            c = {**common, "SCALED": scaled, "ONE_TILE": one_tile, "PERSIST": persist}
            case(f"som grad {dt}", som._som_grad_kernel, t, c, som.GRAD_WARPS, needs, num_stages=som.GRAD_STAGES)
    t = {"tiles_ptr": "*fp64", "meta_ptr": i64, "r_ptr": "*fp64", "b_ptr": "*fp64", "KP": "i32", "NT": "i32",
         "lambda1": "fp64", "lambda2": "fp64", "eps2": "fp64"}  # fmt: skip
    for bc in (16, 64):
        case("som finish", som._som_finish_kernel, t, {"BC": bc}, som.FINISH_WARPS)
    return cases


_CASES = []
_SKIPPED = []  # variants the installed Triton is too old for (declared per op and dtype, refused by the dispatcher)


def _compile(i):
    """None, or why case i does not compile."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    _, kernel, sig, consts, options = _CASES[i]
    try:
        if "constexprs" in inspect.signature(ASTSource).parameters:
            src = ASTSource(fn=kernel, signature=sig, constexprs=consts)
        else:  # Triton 3.0-3.2: ASTSource(fn, signature, constants), the signature without the constexprs
            src = ASTSource(kernel, {a: t for a, t in sig.items() if t != "constexpr"}, constants=consts)
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    except Exception as e:  # every failing case reported, not only the first
        return f"{type(e).__name__}: {e}"
    return None


def _compile_in_child(i, conn):
    conn.send(_compile(i))
    conn.close()


def _compile_all(order, workers):
    """{case: None or why} with each case compiled in a forked child, `workers` at a time: a compiler that aborts
    (an LLVM assertion in an older Triton) then fails its case by name instead of breaking a process pool."""
    import multiprocessing
    import multiprocessing.connection

    fork = multiprocessing.get_context("fork")  # children inherit _CASES: only indices cross
    errors, pending, running = {}, list(order), {}
    while pending or running:
        while pending and len(running) < workers:
            i = pending.pop(0)
            parent, child = fork.Pipe(duplex=False)
            proc = fork.Process(target=_compile_in_child, args=(i, child))
            proc.start()
            child.close()
            running[i] = (proc, parent)
        ready = multiprocessing.connection.wait([c for _, c in running.values()] +
                                                [p.sentinel for p, _ in running.values()])  # fmt: skip
        for i, (proc, conn) in list(running.items()):
            if conn in ready or proc.sentinel in ready:
                try:
                    errors[i] = conn.recv()
                except EOFError:  # the child died before sending: the compiler crashed
                    proc.join()
                    errors[i] = f"the compiler crashed (exit code {proc.exitcode})"
                proc.join()
                conn.close()
                del running[i]
    return errors


def _main():
    _CASES.extend(_cases())
    workers = max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()))
    # costly kernels first keeps the workers busy to the end
    order = sorted(range(len(_CASES)), key=lambda i: not any(s in _CASES[i][0] for s in ("fp64", "jacobi", "hsic")))
    errors = _compile_all(order, workers)
    failed = [_CASES[i][0] for i in sorted(errors) if errors[i] is not None]
    for i in sorted(errors):
        if errors[i] is not None:
            print(f"FAILED {_CASES[i][0]}:\n{errors[i][-2500:]}\n", file=sys.stderr)
    if failed:
        print("failed to compile for sm_90:\n  " + "\n  ".join(failed), file=sys.stderr)
        sys.exit(1)
    import triton

    left = f"; {len(_SKIPPED)} left out, too new for Triton {triton.__version__}" if _SKIPPED else ""
    print(f"compiled {len(_CASES)} kernel variants{left}")


def test_kernels_compile_for_a_gpu():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-8000:]


if __name__ == "__main__":
    _main()
