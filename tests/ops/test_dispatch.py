"""dispatch_as / PCBENCH_DISPATCH: the GPU branches of the ops run on CPU tensors and stay exact."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch
from scipy.spatial import cKDTree

from pcbench.ops import dispatch_as, farthest_point_sample, knn
from pcbench.ops._dispatch import ENV_VAR, dispatch_kind, on_gpu_path
from pcbench.ops._reference import fps_reference, knn_reference
from pcbench.testing.clouds import object_batch, scan_like_scene

# the modules, not the functions that pcbench.ops re-exports under the same names
knn_mod = importlib.import_module("pcbench.ops.knn")
fps_mod = importlib.import_module("pcbench.ops.fps")

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object needs no CUDA runtime


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


def _spy(monkeypatch, module, name: str) -> list[int]:
    """Count calls of ``module.name`` (still calling through)."""
    calls: list[int] = []
    real = getattr(module, name)

    def wrapped(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return calls


def test_default_follows_the_device():
    assert dispatch_kind() == "device"
    assert not on_gpu_path(torch.zeros(1)) and not on_gpu_path(CPU)
    assert on_gpu_path(CUDA)


def test_context_forces_either_path_nests_and_restores_on_error():
    with dispatch_as("cuda"):
        assert on_gpu_path(torch.zeros(1))
        with dispatch_as("cpu"):
            assert not on_gpu_path(CUDA)
            with dispatch_as("device"):
                assert on_gpu_path(CUDA) and not on_gpu_path(CPU)
        assert on_gpu_path(CPU)
    assert not on_gpu_path(CPU)
    with pytest.raises(RuntimeError, match="boom"), dispatch_as("cuda"):
        raise RuntimeError("boom")
    assert dispatch_kind() == "device"


def test_bad_kind_is_named():
    with pytest.raises(ValueError, match=r"dispatch_as\(kind\) must be one of 'cuda', 'cpu', 'device', got 'gpu'"):
        with dispatch_as("gpu"):
            pass


def test_environment_variable_sets_the_default_and_the_context_wins(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "CUDA")
    assert on_gpu_path(CPU)
    with dispatch_as("cpu"):
        assert not on_gpu_path(CPU)
    monkeypatch.setenv(ENV_VAR, "cpu")
    assert not on_gpu_path(CUDA)
    monkeypatch.setenv(ENV_VAR, "fast")
    with pytest.raises(ValueError, match=f"environment variable {ENV_VAR} must be one of .* got 'fast'"):
        on_gpu_path(CPU)


def test_environment_variable_reaches_a_fresh_process():
    code = "import torch; from pcbench.ops._dispatch import on_gpu_path; print(on_gpu_path(torch.zeros(1)))"
    env = {**__import__("os").environ, ENV_VAR: "cuda"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_knn_auto_takes_dense_on_the_gpu_path_for_a_scene(monkeypatch):
    dense = _spy(monkeypatch, knn_mod, "dense_select")
    grid = _spy(monkeypatch, knn_mod, "_grid_into")
    pts = scan_like_scene(3000, seed=4)
    ref_d, _ = cKDTree(pts.double().numpy()).query(pts.double().numpy(), k=16)
    ref = torch.from_numpy(ref_d**2).float()
    cpu_idx, cpu_d2 = knn(pts, pts, 16)
    assert grid and not dense  # the CPU choice for a 3000-point cloud
    grid.clear()
    with dispatch_as("cuda"):
        idx, d2 = knn(pts, pts, 16)
    assert dense and not grid
    torch.testing.assert_close(d2, ref, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(d2, cpu_d2, rtol=0, atol=0)
    assert bool((cpu_d2[idx != cpu_idx] == d2[idx != cpu_idx]).all())  # indices differ only on ties


@pytest.mark.parametrize("block", [1 << 26, 100])
def test_knn_gpu_blocks_are_exact_on_ragged_batches(monkeypatch, gen, block):
    # The GPU block (and a tiny one, so that one cloud spans several chunks) on empty, 1-point and k > n clouds.
    monkeypatch.setattr(knn_mod, "_DENSE_BLOCK", 0)  # would break any chunking that still read the CPU block
    monkeypatch.setattr(knn_mod, "_DENSE_BLOCK_CUDA", block)
    sizes_q, sizes_s = [150, 0, 30, 1, 200, 4], [180, 5, 0, 1, 220, 3]
    q = torch.rand(sum(sizes_q), 3, generator=gen)
    s = torch.rand(sum(sizes_s), 3, generator=gen)
    qo, so = torch.tensor(sizes_q).cumsum(0), torch.tensor(sizes_s).cumsum(0)
    with dispatch_as("cuda"):
        idx, d2 = knn(q, s, 8, qo, so)
    ridx, rd2 = knn_reference(q, s, 8, qo, so)
    assert torch.equal(idx < 0, ridx < 0)
    torch.testing.assert_close(d2, rd2, rtol=1e-5, atol=0.0)


def test_knn_cpu_path_forced_for_a_cuda_choice(monkeypatch):
    # dispatch_as("cpu") must make the device-based choice (here: grid for clouds over 64 points) win.
    grid = _spy(monkeypatch, knn_mod, "_grid_into")
    coord, off = object_batch(2, 256, seed=1)
    with dispatch_as("cpu"):
        knn(coord, coord, 8, off, off)
    assert grid


def test_fps_takes_the_dense_engine_on_the_gpu_path_for_a_scene(monkeypatch):
    dense = _spy(monkeypatch, fps_mod, "_fps_dense")
    coord = scan_like_scene(fps_mod.DENSE_MAX_POINTS + 700, seed=9)
    off = torch.tensor([600, coord.shape[0]])  # the second cloud is over DENSE_MAX_POINTS
    cpu = farthest_point_sample(coord, off, n=300)
    assert not dense  # the CPU path uses the leaf engine above DENSE_MAX_POINTS
    with dispatch_as("cuda"):
        gpu = farthest_point_sample(coord, off, n=300)
    assert dense
    assert torch.equal(gpu, cpu)
    assert torch.equal(gpu, fps_reference(coord, off, n=300))


# The op tests that reach a device-dependent branch, rerun on the GPU path (same references, same checks):
# knn's padded brute force and ball_query's (both orders), incl. empty / single-point clouds, k > n, ties,
# every dtype and extreme coordinate scales. Module aliases, so pytest does not collect them twice here.
import tests.ops.test_ball_query as bq_tests  # noqa: E402
import tests.ops.test_knn as knn_tests  # noqa: E402

F16, F32, F64 = torch.float16, torch.float32, torch.float64
GPU_PATH_CASES = [
    *[(knn_tests.test_ragged_batch_with_empty_single_and_small_clouds, {"method": m, "k": k})
      for m in ("auto", "dense") for k in (1, 5, 16)],
    (knn_tests.test_k_larger_than_every_cloud_pads_with_minus_one_and_inf, {"method": "auto"}),
    (knn_tests.test_empty_query_or_support, {"method": "auto"}),
    (knn_tests.test_duplicates_and_lattice_ties, {"method": "auto"}),
    *[(knn_tests.test_dtypes, {"dtype": d, "method": "dense"}) for d in (F16, F32, F64)],
    *[(knn_tests.test_coordinate_scales_with_far_origin, {"scale": s, "method": "dense"}) for s in (1e-4, 1e4)],
    (knn_tests.test_object_batch_matches_ckdtree_per_cloud, {}),
    *[(knn_tests.test_exact_at_extreme_coordinate_scales, {"method": "auto", "dtype": d, "exponents": e})
      for d, e in ((F32, (66, 100, 124)), (F32, (-66, -100, -124)), (F32, (100, 0, -100)), (F64, (530, -530, 0)))],
    *[(bq_tests.test_ragged_batch_with_empty_and_single_point_clouds, {"radius": r, "max_neighbors": n})
      for r in (0.02, 0.4, 3.0) for n in (1, 40)],
    *[(bq_tests.test_dtypes, {"dtype": d}) for d in (F16, F32, F64)],
    *[(bq_tests.test_coordinate_scales, {"scale": s}) for s in (1e-4, 1e4)],
    (bq_tests.test_duplicates_and_lattice, {}),
    (bq_tests.test_radius_tiny_relative_to_extent, {}),
    *[(bq_tests.test_exact_at_extreme_coordinate_scales, {"dtype": d, "exponent": e})
      for d, e in ((F32, 100), (F32, -100), (F64, 530), (F64, -530))],
    *[(bq_tests.test_index_order_ragged_batch_with_empty_and_single_point_clouds, {"radius": r, "max_neighbors": n})
      for r in (0.02, 0.4, 3.0) for n in (1, 40)],
    *[(bq_tests.test_index_order_dtypes_and_scales, {"dtype": d}) for d in (F16, F32, F64)],
    (bq_tests.test_index_order_duplicates_ties_and_the_strict_boundary, {}),
    (bq_tests.test_index_order_fewer_than_max_neighbors_and_queries_outside_every_ball, {}),
    (bq_tests.test_index_order_matches_the_official_kernel_after_its_padding, {}),
]


def _case_id(case: tuple) -> str:
    fn, kw = case
    return f"{fn.__module__.rsplit('_', 1)[-1]}.{fn.__name__[5:]}[{','.join(map(str, kw.values()))}]"


@pytest.mark.parametrize("case", GPU_PATH_CASES, ids=[_case_id(c) for c in GPU_PATH_CASES])
def test_op_checks_pass_on_the_gpu_path(case, monkeypatch, gen):
    fn, kw = case
    dense = _spy(monkeypatch, knn_mod, "dense_select")
    dense_bq = _spy(monkeypatch, importlib.import_module("pcbench.ops.ball_query"), "dense_select")
    if "gen" in fn.__code__.co_varnames[: fn.__code__.co_argcount]:
        kw = {**kw, "gen": gen}
    with dispatch_as("cuda"):
        fn(**kw)
    if "empty_query_or_support" not in fn.__name__:
        assert dense or dense_bq, "the GPU path must take the padded brute force"
