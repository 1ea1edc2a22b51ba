"""The DMO paper's merge methods that dmo added (weight_average, svd, iso, wudi, wudi2, fisher, fisher_nn) and the
paper's unweighted TIES / DARE / DARE-TIES, against references written here from each method's definition.

The references are deliberately plain: TSV-M with the zero-padded matrices the method's description uses, Iso-C
from one SVD, WUDI as the loss it minimises with torch's own autograd and optimisers (Adam / SGD), Fisher merging
in parameter space over a whole state dict, the paper's TIES with per-entry Python loops. mergekit checks
``weight_average`` (its ``linear``). Then the streaming merge (``dmo merge`` and ``merge_checkpoints``, with tiny
chunks and several threads) and the live bank must give the pure functions' result.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from checkpoints import assert_same_model, load_model, make_set, write_model
from references import naive_ties
from safetensors.torch import save_file
from tolerance import EPS32, assert_close_norm, assert_close_sum
from typer.testing import CliRunner

from dmo.errors import DmoError
from dmo.merge import registry
from dmo.merge.dare import dare, dare_ties, keep_mask
from dmo.merge.experts import ParamFilter
from dmo.merge.fisher_merge import fisher, fisher_nn
from dmo.merge.live import ExpertBank
from dmo.merge.spectral import iso, svd
from dmo.merge.stream import MergeOptions, merge_checkpoints
from dmo.merge.ties import ties
from dmo.merge.wudi import Quadratic, wudi, wudi2

NEW = ("weight_average", "svd", "iso", "wudi", "wudi2", "fisher", "fisher_nn")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one intra-op thread is faster, and on a busy machine OpenMP barriers would dominate."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------------ references


def _tsv_factors(deltas: torch.Tensor, coef: list[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TSV-M's zero-padded U (m x p), s (p), V^T (p x n) of the top 1/K triplets of each task (float64)."""
    present = [i for i, c in enumerate(coef) if c != 0]
    m, n = deltas.shape[1:]
    p = min(m, n)
    r = int(p * (1.0 / len(present)))
    u_all, s_all, v_all = (
        torch.zeros(m, p, dtype=torch.float64),
        torch.zeros(p, dtype=torch.float64),
        torch.zeros(p, n, dtype=torch.float64),
    )
    for slot, i in enumerate(present):
        u, s, vh = torch.linalg.svd(coef[i] * deltas[i].double(), full_matrices=False)
        u_all[:, slot * r : (slot + 1) * r] = u[:, :r]
        s_all[slot * r : (slot + 1) * r] = s[:r]
        v_all[slot * r : (slot + 1) * r] = vh[:r]
    return u_all, s_all, v_all


def ref_tsv(deltas: torch.Tensor, coef: list[float]) -> torch.Tensor:
    """TSV-M as described: the polar factors of the padded U and V^T around diag(s) (float64)."""
    u_all, s_all, v_all = _tsv_factors(deltas, coef)
    uu, _, uvh = torch.linalg.svd(u_all, full_matrices=False)
    vu, _, vvh = torch.linalg.svd(v_all, full_matrices=False)
    return (uu @ uvh @ torch.diag(s_all) @ vu @ vvh).float()


def tsv_rtol(deltas: torch.Tensor, coef: list[float]) -> float:
    """The float32 result's error bound relative to its norm: SVDs are backward stable (error ~ n eps ||A||), and a
    polar factor amplifies its input's error by up to 1 / sigma_min of the matrix it orthogonalises, so
    rtol = n * eps * cond, cond the worse of the padded U's and V^T's (their used columns / rows), times 2 for the two
    SVD stages. Measured on these random tasks: 0.005-0.08 of this bound, on every kernel path."""
    u_all, _, v_all = _tsv_factors(deltas, coef)
    used = [c for c in range(u_all.shape[1]) if u_all[:, c].any()]
    cond = max(
        1 / float(torch.linalg.svdvals(u_all[:, used]).min()), 1 / float(torch.linalg.svdvals(v_all[used]).min())
    )
    return 2 * max(deltas.shape[1:]) * EPS32 * cond


def iso_rtol(summed: torch.Tensor) -> float:
    """Iso-C's result is mean(s) times the polar factor U V^T of the summed matrix: its error relative to its norm is
    about n * eps * sigma_max / sigma_min of that matrix (the polar factor's condition), times 2 for slack."""
    s = torch.linalg.svdvals(summed.double())
    return 2 * max(summed.shape) * EPS32 * float(s.max() / s.min())


#: WUDI / WUDI2 against the same float32 optimiser through autograd: each step's gradient agrees to ~n * eps relative
#: (n <= 40 here: 5e-6), so the iterate's error is about that times the path it travelled (<= 0.2 of its norm), plus
#: WUDI2's SVD targets' n * eps: ~1e-6 of the result's norm; 10x slack. Measured: 2e-8 to 3e-7 on every kernel path.
OPTIMISER_RTOL = 1e-5


def ref_iso(deltas: torch.Tensor, coef: list[float]) -> torch.Tensor:
    summed = sum(c * d.double() for c, d in zip(coef, deltas))
    u, s, vh = torch.linalg.svd(summed, full_matrices=False)
    return (u @ torch.diag(torch.full_like(s, float(s.mean()))) @ vh).float()


def ref_wudi(tvs: list[torch.Tensor], init: torch.Tensor, iterations: int = 300) -> torch.Tensor:
    """Adam (lr 1e-5) on sum_i ||(tau - tau_i) tau_i^T||^2 / ||tau_i||^2 through autograd."""
    tau = init.clone().requires_grad_(True)
    opt = torch.optim.Adam([tau], lr=1e-5)
    for _ in range(iterations):
        opt.zero_grad()
        loss = sum(((tau - t) @ t.T).square().sum() / t.square().sum() for t in tvs)
        loss.backward()
        opt.step()
    return tau.detach()


def ref_wudi2(tvs: list[torch.Tensor], norms_of: list[torch.Tensor], init: torch.Tensor, k: int) -> torch.Tensor:
    """SGD (lr 1e-4, momentum 0.9) on the low-rank loss with the m x n matrices [S_r V_r^T; 0] (full SVDs)."""
    m, n = tvs[0].shape
    r = int(min(m, n) / k)
    approx, low = [], []
    for t in tvs:
        u, s, vh = torch.linalg.svd(t, full_matrices=True)
        padded = torch.zeros(m, n)
        padded[:r] = s[:r, None] * vh[:r]
        low.append(padded)
        approx.append(u[:, :r] @ torch.diag(s[:r]) @ vh[:r])
    tau = init.clone().requires_grad_(True)
    opt = torch.optim.SGD([tau], lr=1e-4, momentum=0.9)
    for _ in range(300):
        opt.zero_grad()
        loss = sum(((tau - a) @ lo.T).square().sum() / x.square().sum() for a, lo, x in zip(approx, low, norms_of))
        loss.backward()
        opt.step()
    return tau.detach()


def ref_paper_ties(deltas: torch.Tensor, density: float, scale: float = 1.0) -> torch.Tensor:
    """The paper's TIES by definition: keep |x| >= the int(n(1-density))-th smallest, sum's sign (ties: the majority
    sign of the tensor), mean of the agreeing entries."""
    k_exp = deltas.shape[0]
    flats = []
    for d in deltas:
        values = d.reshape(-1).tolist()
        k = int(len(values) * (1 - density))
        kth = sorted(abs(v) for v in values)[k - 1] if k >= 1 else -1.0
        flats.append([v if abs(v) >= kth else 0.0 for v in values])
    n = len(flats[0])
    totals = [sum(flats[i][j] for i in range(k_exp)) for j in range(n)]
    signs = [(t > 0) - (t < 0) for t in totals]
    majority = sum(signs)
    majority = (majority > 0) - (majority < 0)
    out = []
    for j in range(n):
        sign = signs[j] or majority
        agree = [flats[i][j] for i in range(k_exp) if flats[i][j] * sign > 0]
        out.append(sum(agree) / max(1, len(agree)) * scale)
    return torch.tensor(out).reshape(deltas.shape[1:])


def ref_fisher(
    thetas: list[dict[str, torch.Tensor]], fishers: list[dict[str, torch.Tensor]], alphas: list[float], normalize: bool
) -> dict[str, torch.Tensor]:
    """Fisher-weighted averaging over a whole state dict (parameter space), eps = 1e-6 (float64)."""
    eps = 1e-6
    coef = torch.tensor(alphas, dtype=torch.float64)
    if normalize:
        norms = torch.tensor([sum(float(f.double().square().sum()) for f in fi.values()) ** 0.5 for fi in fishers])
        inverse = 1.0 / (norms.double() + eps)
        coef = coef * inverse / inverse.sum()
    out = {}
    for p in thetas[0]:
        num = sum(c * (f[p].double() + eps) * t[p].double() for c, f, t in zip(coef, fishers, thetas))
        den = sum(c * (f[p].double() + eps) for c, f in zip(coef, fishers))
        out[p] = (num / den).float()
    return out


def run_chunked(method: str, deltas: torch.Tensor, weights: torch.Tensor, chunk: int, **params) -> torch.Tensor:
    """A method's chunked form driven chunk by chunk as the streaming engine does (statistics, joint pass, merge),
    with the function's defaults as the engine passes them."""
    spec = registry.get_method(method)
    k = deltas.shape[0]
    flat = deltas.reshape(k, -1)
    n = flat.shape[1]
    name = params.pop("name", "")
    method = spec.make_chunked(weights, n, name, params)
    if method.stats:
        for i in range(k):
            for lo in range(0, n, chunk):
                method.observe(i, lo, flat[i, lo : lo + chunk].clone())
            method.done(i)
    if method.joint:
        for lo in range(0, n, chunk):
            method.observe_all(flat[:, lo : lo + chunk].clone(), lo)
    parts = [method.merge(flat[:, lo : lo + chunk].clone(), lo) for lo in range(0, n, chunk)]
    return torch.cat(parts).reshape(deltas.shape[1:])


# ------------------------------------------------------------------------------------------------------- registry


def test_every_new_method_is_registered_with_documented_parameters() -> None:
    assert set(NEW) <= set(registry.method_names())
    assert registry.get_method("weight_average").defaults == {"weighted": True}
    assert registry.get_method("svd").defaults == {"weighted": True, "scope": "all", "scale": 1.0}
    assert registry.get_method("iso").defaults == {"weighted": True, "scale": 1.0}
    assert registry.get_method("wudi").defaults == {"iterations": 300, "lr": 1e-5, "weighted": True, "scale": 1.0}
    assert registry.get_method("wudi2").defaults == {
        "iterations": 300, "lr": 1e-4, "momentum": 0.9, "weighted": True, "scale": 1.0,
    }  # fmt: skip
    assert registry.get_method("fisher").defaults == {"weighted": True, "minimal": 1e-6}
    assert registry.get_method("fisher").extra == ("fisher",) and registry.get_method("fisher_nn").extra == ("fisher",)
    for name in ("ties", "dare", "dare_ties"):
        assert registry.get_method(name).defaults["weighted"] is True
    assert registry.get_method("dare_ties").defaults["density"] == 1.0  # no trim by default (mergekit's dare_ties)
    for name in ("svd", "iso", "wudi", "wudi2", "fisher"):  # whole-tensor methods: per parameter in the stream
        assert registry.get_method(name).chunked is None
    for name, params in registry.PAPER_PARAMS.items():
        assert registry.get_method(name).check_params(params) == params


@pytest.mark.parametrize(
    ("method", "valid"),
    [
        ("weight_average", "weighted=True"),
        ("svd", "weighted=True, scope='all', scale=1.0"),
        ("iso", "weighted=True, scale=1.0"),
        ("wudi", "iterations=300, lr=1e-05, weighted=True, scale=1.0"),
        ("wudi2", "iterations=300, lr=0.0001, momentum=0.9, weighted=True, scale=1.0"),
        ("fisher", "weighted=True, minimal=1e-06"),
        ("fisher_nn", "weighted=True, minimal=1e-06"),
        ("ties", "density=0.2, consensus='sum', normalize=True, scale=1.0, weighted=True"),
    ],
)
def test_unknown_parameters_are_refused_naming_the_valid_ones(method: str, valid: str) -> None:
    with pytest.raises(DmoError, match=f"has no parameter 'rank'; its parameters: {valid}$"):
        registry.get_method(method).check_params({"rank": 4})
    with pytest.raises(DmoError, match="has no parameter 'fisher'"):  # an input, not a parameter
        registry.get_method("fisher").check_params({"fisher": 1})


def test_bad_parameter_values_are_refused() -> None:
    d, w = randn(2, 4, 5, seed=0), torch.ones(2)
    with pytest.raises(DmoError, match="scope must be one of all, lm_head"):
        svd(d, w, scope="mlp")
    with pytest.raises(DmoError, match="iterations must be"):
        wudi(d, w, iterations=-1)
    with pytest.raises(DmoError, match="momentum must be"):
        wudi2(d, w, momentum=1.0)
    with pytest.raises(DmoError, match="non-negative weights"):
        fisher_nn(d, torch.tensor([1.0, -0.5]), randn(2, 4, 5, seed=1).abs())
    with pytest.raises(DmoError, match="sum to 0"):
        registry.merge_deltas("weight_average", [{"p": d[0]}, {"p": d[1]}], [1.0, -1.0])


# ------------------------------------------------------------------------------------------------- weight_average


def test_weight_average_renormalises_and_unweighted_is_the_mean_of_the_present() -> None:
    d = randn(3, 6, 7, seed=1)
    w = torch.tensor([0.5, 0.3, 0.4])
    want = sum(float(w[i]) * d[i] for i in range(3)) / 1.2
    torch.testing.assert_close(registry.weight_average(d, w), want)
    w0 = torch.tensor([0.7, 0.0, 0.1])  # expert 1 is not in the mixture
    torch.testing.assert_close(registry.weight_average(d, w0, weighted=False), (d[0] + d[2]) / 2)
    torch.testing.assert_close(run_chunked("weight_average", d, w, 5), want)


def test_weight_average_matches_mergekit_linear(tmp_path: Path) -> None:
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions as MergekitOptions
    from mergekit.merge import run_merge

    base, experts = make_set(tmp_path, torch.float32, n=3, shards=1, seed=3)
    weights = {"e0": 0.5, "e1": 0.3, "e2": 0.4}  # sum 1.2: mergekit's linear (normalize: true) divides by it
    models = [{"model": str(experts[e]), "parameters": {"weight": w}} for e, w in weights.items()]
    config = {"merge_method": "linear", "dtype": "float32", "out_dtype": "float32", "models": models}
    options = MergekitOptions(copy_tokenizer=False, write_model_card=False, quiet=True, lazy_unpickle=False)
    run_merge(MergeConfiguration.model_validate(config), str(tmp_path / "mk"), options=options)
    merge_checkpoints(base, experts, weights, tmp_path / "dmo", MergeOptions(method="weight_average", exclude=[]))
    theirs = load_model(tmp_path / "mk")
    ours = load_model(tmp_path / "dmo")
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-5, atol=1e-6, msg=k)


# ------------------------------------------------------------------------------------------------------------ TSV


@pytest.mark.parametrize(("k", "m", "n"), [(2, 12, 20), (3, 20, 12), (4, 16, 16), (3, 7, 30)])
def test_svd_equals_tsv_merge_by_definition(k: int, m: int, n: int) -> None:
    d = randn(k, m, n, seed=k * 100 + m)
    ones = [1.0] * k
    assert_close_norm(svd(d, rand(k, seed=k) + 0.1, weighted=False), ref_tsv(d, ones), tsv_rtol(d, ones))
    w = [0.5, 0.2, 0.8, 0.3][:k]
    assert_close_norm(svd(d, torch.tensor(w)), ref_tsv(d, w), tsv_rtol(d, w))
    torch.testing.assert_close(svd(d, torch.ones(k)), svd(d, torch.tensor(w), weighted=False))  # weights 1 = paper


def test_svd_of_orthogonal_tasks_is_the_sum_of_their_truncations() -> None:
    """TSV's premise: when the tasks' singular vectors are mutually orthogonal the polar factors change nothing."""
    q_left, _ = torch.linalg.qr(randn(16, 16, seed=5))
    q_right, _ = torch.linalg.qr(randn(24, 24, seed=6))
    s = torch.linspace(3.0, 0.5, 8)
    tasks = torch.stack(
        [q_left[:, 8 * i : 8 * i + 8] @ torch.diag(s) @ q_right[:, 8 * i : 8 * i + 8].T for i in range(2)]
    )
    truncated = sum(q_left[:, 8 * i : 8 * i + 8] @ torch.diag(s) @ q_right[:, 8 * i : 8 * i + 8].T for i in range(2))
    assert_close_norm(svd(tasks, torch.ones(2)), truncated, tsv_rtol(tasks, [1.0, 1.0]))


def test_svd_falls_back_to_the_mean_and_scope_lm_head_is_the_papers_code() -> None:
    d1 = randn(3, 9, seed=7)
    w = torch.tensor([0.5, 0.3, 0.2])
    torch.testing.assert_close(svd(d1, w, weighted=False), d1.mean(0))
    torch.testing.assert_close(svd(d1, w), (w[:, None] * d1).sum(0) / w.sum())
    d = randn(3, 10, 6, seed=8)
    # the paper's svd: TSV on lm_head.weight only, every other tensor averaged
    torch.testing.assert_close(svd(d, w, weighted=False, scope="lm_head", name="model.layers.0.mlp.up_proj.weight"),
                               d.mean(0))  # fmt: skip
    assert_close_norm(svd(d, w, weighted=False, scope="lm_head", name="lm_head.weight"), ref_tsv(d, [1.0] * 3),
                      tsv_rtol(d, [1.0] * 3))  # fmt: skip


def test_svd_leaves_out_experts_that_do_not_change_the_matrix() -> None:
    d = randn(3, 12, 9, seed=9)
    d[1] = 0.0  # e.g. a LoRA expert without this module: no singular vectors of its own, K still counts it
    got = svd(d, torch.ones(3), weighted=False)
    rank = int(9 * (1 / 3))
    blocks = [torch.linalg.svd(d[i], full_matrices=False) for i in (0, 2)]
    u = torch.cat([b[0][:, :rank] for b in blocks], dim=1)
    s = torch.cat([b[1][:rank] for b in blocks])
    vh = torch.cat([b[2][:rank] for b in blocks])
    pu, _, qu = torch.linalg.svd(u, full_matrices=False)
    pv, _, qv = torch.linalg.svd(vh, full_matrices=False)
    assert_close_norm(got, pu @ qu @ torch.diag(s) @ pv @ qv, tsv_rtol(d[[0, 2]], [1.0, 1.0]))
    assert torch.isfinite(got).all()


# ---------------------------------------------------------------------------------------------------------- Iso-C


@pytest.mark.parametrize(("k", "m", "n"), [(2, 12, 20), (3, 20, 12), (4, 5, 5)])
def test_iso_equals_iso_c_by_definition(k: int, m: int, n: int) -> None:
    d = randn(k, m, n, seed=k + m)
    w = [0.6, 0.3, 0.9, 0.2][:k]
    assert_close_norm(iso(d, torch.tensor(w), weighted=False), ref_iso(d, [1.0] * k), iso_rtol(d.sum(0)))
    got = iso(d, torch.tensor(w))
    summed = sum(c * x for c, x in zip(w, d))
    assert_close_norm(got, ref_iso(d, w), iso_rtol(summed))
    sv = torch.linalg.svdvals(got)  # an isotropic spectrum: every singular value is the mean of the summed matrix's
    assert_close_norm(sv, torch.full_like(sv, float(torch.linalg.svdvals(summed).mean())), iso_rtol(summed))
    d1 = randn(k, 11, seed=k)
    torch.testing.assert_close(iso(d1, torch.tensor(w), weighted=False, scale=0.5), 0.5 * d1.mean(0))


# ----------------------------------------------------------------------------------------------------------- WUDI


@pytest.mark.parametrize(("m", "n", "k"), [(16, 24, 3), (24, 10, 2), (3, 40, 2), (4, 12, 2)])
def test_quadratic_gradient_is_the_autograd_gradient(m: int, n: int, k: int) -> None:
    """Both branches (n x n H, and the stacked factors when 2R < n) against autograd of the written-out loss."""
    targets = [randn(m, n, seed=i) for i in range(k)]
    factors = [randn(m, n, seed=10 + i) / 5 for i in range(k)]
    q = Quadratic(targets, factors, (m, n), targets[0])
    assert q.dense == (n <= 2 * k * m)
    tau = randn(m, n, seed=99).requires_grad_(True)
    sum(((tau - x) @ f.T).square().sum() for x, f in zip(targets, factors)).backward()
    torch.testing.assert_close(q.grad(tau.detach(), torch.empty(m, n)), tau.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("k", "m", "n"), [(3, 12, 20), (2, 20, 8), (2, 3, 40)])
def test_wudi_equals_adam_on_its_loss(k: int, m: int, n: int) -> None:
    d = randn(k, m, n, seed=m * n, scale=0.05)
    tvs = list(d)
    want = ref_wudi(tvs, d.sum(0))
    got = wudi(d, rand(k, seed=m) + 0.5, weighted=False, name="model.layers.0.mlp.up_proj.weight")
    assert (
        float((got - d.sum(0)).norm() / got.norm()) > 100 * OPTIMISER_RTOL
    )  # it moved, by far more than the tolerance
    assert_close_norm(got, want, OPTIMISER_RTOL)
    w = [0.6, 0.4, 0.7][:k]
    scaled = [c * t for c, t in zip(w, tvs)]  # weighted: the method on w_i tau_i
    assert_close_norm(wudi(d, torch.tensor(w)), ref_wudi(scaled, sum(scaled)), OPTIMISER_RTOL)


def test_wudi_falls_back_to_the_mean_for_vectors_and_lm_head() -> None:
    d = randn(3, 6, 8, seed=3)
    w = torch.tensor([0.2, 0.3, 0.5])
    torch.testing.assert_close(wudi(d, w, weighted=False, name="lm_head.weight"), d.mean(0))
    torch.testing.assert_close(wudi2(d, w, name="lm_head.weight"), (w[:, None, None] * d).sum(0) / w.sum())
    torch.testing.assert_close(wudi(d[:, 0], w, weighted=False), d[:, 0].mean(0))
    d[2] = 0.0  # an expert that does not change the matrix: no loss term (the paper's would be 0/0)
    assert torch.isfinite(wudi(d, w, iterations=20)).all() and torch.isfinite(wudi2(d, w, iterations=20)).all()


@pytest.mark.parametrize(("k", "m", "n"), [(3, 12, 20), (2, 20, 9), (2, 3, 40)])
def test_wudi2_equals_sgd_on_its_low_rank_loss(k: int, m: int, n: int) -> None:
    d = randn(k, m, n, seed=m + n, scale=0.05)
    tvs = list(d)
    want = ref_wudi2(tvs, tvs, d.mean(0), k)
    got = wudi2(d, rand(k, seed=n) + 0.5, weighted=False, name="model.layers.1.self_attn.q_proj.weight")
    assert float((got - d.mean(0)).norm() / got.norm()) > 100 * OPTIMISER_RTOL
    assert_close_norm(got, want, OPTIMISER_RTOL)
    w = torch.tensor([0.6, 0.4, 0.7][:k])
    scaled = [float(c) * t for c, t in zip(w, tvs)]  # targets from w_i tau_i, start at the weighted mean
    want = ref_wudi2(scaled, scaled, sum(scaled) / float(w.sum()), k)
    assert_close_norm(wudi2(d, w), want, OPTIMISER_RTOL)


# --------------------------------------------------------------------------------------------------------- Fisher


def _fisher_world(k: int = 3) -> tuple[dict[str, torch.Tensor], list[dict], list[dict]]:
    shapes = {"a.weight": (6, 5), "a.bias": (6,), "b.weight": (4, 6)}
    base = {p: randn(*s, seed=i) for i, (p, s) in enumerate(shapes.items())}
    thetas = [{p: base[p] + randn(*s, seed=10 * e + i, scale=0.1) for i, (p, s) in enumerate(shapes.items())}
              for e in range(k)]  # fmt: skip
    fishers = [{p: randn(*s, seed=50 + 10 * e + i).square() * (e + 1) for i, (p, s) in enumerate(shapes.items())}
               for e in range(k)]  # fmt: skip
    return base, thetas, fishers


@pytest.mark.parametrize(("method", "normalize"), [("fisher", True), ("fisher_nn", False)])
def test_fisher_equals_fisher_weighted_averaging_over_the_whole_model(method: str, normalize: bool) -> None:
    base, thetas, fishers = _fisher_world()
    tvs = [{p: t[p] - base[p] for p in base} for t in thetas]
    alphas = [0.5, 0.25, 0.25]
    merged = registry.merge_deltas(method, tvs, alphas, extra={"fisher": fishers})
    want = ref_fisher(thetas, fishers, alphas, normalize)
    for p in base:
        torch.testing.assert_close(base[p] + merged[p], want[p], rtol=1e-5, atol=1e-6)
    unweighted = registry.merge_deltas(method, tvs, alphas, extra={"fisher": fishers}, weighted=False)
    want = ref_fisher(thetas, fishers, [1.0, 1.0, 1.0], normalize)
    for p in base:
        torch.testing.assert_close(base[p] + unweighted[p], want[p], rtol=1e-5, atol=1e-6)


def test_fisher_norms_are_model_wide_and_inputs_are_checked() -> None:
    base, thetas, fishers = _fisher_world()
    tvs = [{p: t[p] - base[p] for p in base} for t in thetas]
    d = torch.stack([tv["a.weight"] for tv in tvs])
    f = torch.stack([fi["a.weight"] for fi in fishers])
    alone = fisher(d, torch.ones(3), f, None)  # one parameter: its own norms
    whole = registry.merge_deltas("fisher", tvs, [1.0] * 3, extra={"fisher": fishers})["a.weight"]
    assert not torch.allclose(alone, whole)
    with pytest.raises(DmoError, match=r"needs extra=\{'fisher'"):
        registry.merge_deltas("fisher", tvs, [1.0] * 3)
    bad = [dict(fi) for fi in fishers]
    del bad[1]["b.weight"]
    with pytest.raises(DmoError, match="fisher weights of expert #1 have no tensor b.weight"):
        registry.merge_deltas("fisher_nn", tvs, [1.0] * 3, extra={"fisher": bad})
    bad[1]["b.weight"] = torch.ones(6, 4)
    with pytest.raises(DmoError, match=r"give b.weight the shape \[6, 4\], but it has shape \[4, 6\]"):
        registry.merge_deltas("fisher_nn", tvs, [1.0] * 3, extra={"fisher": bad})


# --------------------------------------------------------------------------- the paper's unweighted TIES and DARE


@pytest.mark.parametrize(
    ("k", "shape", "density"), [(3, (7, 9), 0.2), (2, (50,), 0.2), (4, (6, 5), 0.5), (3, (4,), 1.0)]
)
def test_unweighted_ties_is_the_papers_ties(k: int, shape: tuple[int, ...], density: float) -> None:
    d = randn(k, *shape, seed=sum(shape) + k)
    w = rand(k, seed=k) + 0.1  # ignored
    want = ref_paper_ties(d, density, 0.9)
    assert_close_sum(ties(d, w, density=density, weighted=False, scale=0.9), want, 0.9 * d)  # a mean of agreeing
    chunked = run_chunked("ties", d, w, 4, density=density, weighted=False, scale=0.9)
    assert_close_sum(chunked, want, 0.9 * d)


def _cancelling(seed: int) -> torch.Tensor:
    """Deltas of dyadic values whose sum is exactly 0 at some entries, with a negative majority elsewhere."""
    g = torch.Generator().manual_seed(seed)
    d0 = torch.round(torch.randn(40, generator=g) * 16) / 16
    d1 = -(torch.rand(40, generator=g) * 8).round() / 16 - 1 / 16  # mostly negative: the majority sign is -1
    d2 = torch.round(torch.randn(40, generator=g) * 4) / 16 - 0.25
    d1[:10], d2[:10] = -d0[:10], 0.0  # entries 0..9: d0 and -d0 cancel exactly
    d0[:10] = torch.where(d0[:10] == 0, 0.5, d0[:10])
    d1[:10] = -d0[:10]
    return torch.stack([d0, d1, d2])


def test_unweighted_ties_breaks_exact_cancellations_with_the_majority_sign() -> None:
    d = _cancelling(4)
    want = ref_paper_ties(d, 1.0)
    got = ties(d, torch.ones(3), density=1.0, weighted=False)
    torch.testing.assert_close(got, want)
    assert torch.equal(got[:10], -d[0, :10].abs())  # the negative one of each cancelling pair
    assert torch.equal(run_chunked("ties", d, torch.ones(3), 7, density=1.0, weighted=False), got)
    # dmo's weighted TIES (mergekit's rule) elects + there instead
    assert torch.equal(ties(d, torch.ones(3), density=1.0)[:10], d[0, :10].abs())


def test_unweighted_ties_and_dare_leave_out_experts_not_in_the_mixture() -> None:
    d = randn(3, 8, 6, seed=11)
    w = torch.tensor([0.3, 0.0, 0.7])
    assert_close_sum(ties(d, w, weighted=False), ref_paper_ties(d[[0, 2]], 0.2), d[[0, 2]])
    mask = [keep_mask((8, 6), 0.2, seed=1, name="x", index=i) for i in range(3)]
    want = (d[0] * mask[0] + d[2] * mask[2]) / 0.8
    torch.testing.assert_close(dare(d, w, drop_rate=0.2, seed=1, weighted=False, name="x"), want)


@pytest.mark.parametrize("density", [0.2, 1.0])
def test_unweighted_dare_and_dare_ties_are_the_papers(density: float) -> None:
    d = randn(3, 9, 11, seed=12)
    w = torch.tensor([0.5, 0.2, 0.3])  # ignored
    name = "model.layers.0.mlp.down_proj.weight"
    sparse = torch.stack([d[i] * keep_mask((9, 11), 0.2, seed=5, name=name, index=i) / (1 - 0.2) for i in range(3)])
    # the paper's dare_ta: task arithmetic without coefficients over the dropped-and-rescaled deltas
    torch.testing.assert_close(dare(d, w, drop_rate=0.2, seed=5, weighted=False, name=name), sparse.sum(0))
    # its dare_ties: the same deltas through its TIES (keep 20% + ties, majority sign, mean of the agreeing)
    got = dare_ties(d, w, drop_rate=0.2, seed=5, density=density, weighted=False, name=name)
    assert_close_sum(got, ref_paper_ties(sparse, density), sparse)
    chunked = run_chunked("dare_ties", d, w, 10, name=name, drop_rate=0.2, seed=5, density=density, weighted=False)
    torch.testing.assert_close(chunked, got, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("rescale", ["inverse", "l1"])
def test_weighted_dare_ties_with_a_density_trims_like_ties(rescale: str) -> None:
    d = randn(3, 8, 9, seed=13)
    w = torch.tensor([0.5, 0.3, 0.4])
    name = "p"
    masks = [keep_mask((8, 9), 0.4, seed=2, name=name, index=i) for i in range(3)]
    sparse = []
    for i in range(3):
        kept = d[i] * masks[i]
        kept = kept / 0.6 if rescale == "inverse" else kept * (d[i].abs().sum() / kept.abs().sum())
        sparse.append(kept)
    want = naive_ties(torch.stack(sparse), w, 0.3)
    got = dare_ties(d, w, drop_rate=0.4, rescale=rescale, seed=2, density=0.3, name=name)
    terms = w[:, None, None] * torch.stack(sparse) / float(w.min())  # weighted agreeing sum / their weights' sum
    assert_close_sum(got, want, terms)
    chunked = run_chunked("dare_ties", d, w, 16, name=name, drop_rate=0.4, rescale=rescale, seed=2, density=0.3)
    torch.testing.assert_close(chunked, got, rtol=1e-6, atol=1e-7)
    # density 1 is the old behaviour: no trim
    assert_close_sum(
        dare_ties(d, w, drop_rate=0.4, rescale=rescale, seed=2, name=name),
        naive_ties(torch.stack(sparse), w, 1.0), terms,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------- dmo merge, end to end


def _reference(base: Path, experts: dict[str, Path], weights: dict[str, float], method: str, params: dict,
               keep=lambda n: True, extra=None) -> dict[str, torch.Tensor]:  # fmt: skip
    """base + the pure function on each tensor's stacked deltas (experts in the weights' order)."""
    spec = registry.get_method(method)
    b = load_model(base)
    xs = [load_model(experts[e]) for e in weights]
    w = torch.tensor(list(weights.values()))
    inputs = dict(spec.prepare({k: [{p: f[p] for p in b if keep(p)} for f in v] for k, v in (extra or {}).items()})
                  if spec.prepare else {})  # fmt: skip
    out = {}
    for k, v in b.items():
        if not keep(k):
            out[k] = v
            continue
        deltas = torch.stack([x[k].float() - v.float() for x in xs])
        call = dict(inputs, **({"name": k} if spec.takes_name else {}))
        for key, per_expert in (extra or {}).items():
            call[key] = torch.stack([f[k] for f in per_expert])
        out[k] = (v.float() + spec.fn(deltas, w, **params, **call)).to(v.dtype)
    return out


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("weight_average", {}),
        ("svd", {"weighted": False}),
        ("svd", {"scope": "lm_head", "scale": 0.8}),
        ("iso", {}),
        ("wudi", {"weighted": False, "iterations": 60}),
        ("wudi2", {"iterations": 40}),
    ],
)
def test_dmo_merge_runs_each_method_per_tensor(tmp_path: Path, method: str, params: dict) -> None:
    from dmo.cli import app

    make_set(tmp_path, torch.float32, n=3, visual=True, seed=1)
    manifest = tmp_path / "experts.yaml"
    manifest.write_text("name: tiny\nkind: full\nbase: ./base\nexperts: {general: ./e0, ocr: ./e1, chart: ./e2}\n")
    args = ["merge", "--experts", str(manifest), "--weights", "general=0.5,ocr=0.3,chart=0.2", "--out",
            str(tmp_path / "proxy"), "--method", method]  # fmt: skip
    for k, v in params.items():
        args += ["--param", f"{k}={json.dumps(v)}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "proxy" / "dmo_merge.json").read_text())
    assert record["method"] == method and record["params"] == params
    weights = {"e0": 0.5, "e1": 0.3, "e2": 0.2}
    experts = {e: tmp_path / e for e in weights}
    want = _reference(tmp_path / "base", experts, weights, method, params, keep=ParamFilter("full"))
    got = load_model(tmp_path / "proxy")
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=2e-6, msg=k)


def _dyadic_set(root: Path, seed: int) -> tuple[Path, dict[str, Path]]:
    """Float32 checkpoints on a 1/16 grid (exact deltas) where two experts cancel exactly in places."""
    from checkpoints import qwen2_shapes

    g = torch.Generator().manual_seed(seed)
    base = {k: torch.round(torch.randn(s, generator=g) * 8) / 8 for k, s in qwen2_shapes().items()}
    experts = {}
    for i in range(3):
        tensors = {}
        for k, v in base.items():
            c = _cancelling(seed + hash(k) % 1000)
            reps = (v.numel() + 39) // 40
            tensors[k] = v + c[i].repeat(reps)[: v.numel()].reshape(v.shape)
        experts[f"e{i}"] = write_model(root / f"e{i}", tensors)
    return write_model(root / "base", base), experts


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("ties", {"weighted": False, "density": 1.0}),
        ("ties", {"weighted": False}),
        ("dare_ties", {"weighted": False, "drop_rate": 0.2, "density": 0.2}),
        ("dare", {"weighted": False, "drop_rate": 0.2}),
        ("svd", {}),
    ],
)
def test_streaming_in_tiny_chunks_and_threads_equals_the_pure_function(
    tmp_path: Path, method: str, params: dict
) -> None:
    # the dyadic set's repeated rows make degenerate spectra, where TSV's truncation is not unique: random for svd
    base, experts = make_set(tmp_path, torch.float32, n=3, seed=2) if method == "svd" else _dyadic_set(tmp_path, 2)
    weights = {"e0": 0.2, "e1": 0.5, "e2": 0.3}
    merge_checkpoints(
        base,
        experts,
        weights,
        tmp_path / "out",
        MergeOptions(method=method, params=params, exclude=[], chunk=64, threads=2),
    )
    want = _reference(base, experts, weights, method, params)
    got = load_model(tmp_path / "out")
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6, msg=k)


def _fisher_files(root: Path, experts: dict[str, Path], seed: int) -> dict[str, Path]:
    out = {}
    for i, (name, folder) in enumerate(experts.items()):
        model = load_model(folder)
        g = torch.Generator().manual_seed(seed + i)
        fisher_dir = root / f"fisher-{name}"
        fisher_dir.mkdir()
        save_file({k: torch.rand(v.shape, generator=g) * (i + 1) for k, v in model.items()},
                  str(fisher_dir / "fisher_weights.safetensors"))  # fmt: skip
        out[name] = fisher_dir
    return out


@pytest.mark.parametrize("method", ["fisher", "fisher_nn"])
def test_fisher_streams_with_the_experts_fisher_files(tmp_path: Path, method: str) -> None:
    base, experts = make_set(tmp_path, torch.float32, n=3, shards=2, visual=True, seed=4)
    files = _fisher_files(tmp_path, experts, 40)
    weights = {"e0": 0.5, "e1": 0.3, "e2": 0.2}
    stats = merge_checkpoints(
        base, experts, weights, tmp_path / "out", MergeOptions(method=method, extra={"fisher": files})
    )
    keep = ParamFilter("full")
    fishers = [load_model(files[e]) for e in weights]
    want = _reference(base, experts, weights, method, {}, keep=keep, extra={"fisher": fishers})
    got = load_model(tmp_path / "out")
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    assert json.loads((tmp_path / "out" / "dmo_merge.json").read_text())["inputs"]["fisher"]["e1"] == str(files["e1"])
    assert stats.merged == sum(keep(k) for k in want)


def test_fisher_bad_input(tmp_path: Path) -> None:
    base, experts = make_set(tmp_path, torch.float32, n=2, shards=1, seed=5)
    weights = {"e0": 0.5, "e1": 0.5}
    with pytest.raises(DmoError, match="needs each expert's fisher weights"):
        merge_checkpoints(base, experts, weights, tmp_path / "a", MergeOptions(method="fisher"))
    files = _fisher_files(tmp_path, experts, 1)
    with pytest.raises(DmoError, match="fisher weights given, but merge method 'svd' takes no per-expert inputs"):
        merge_checkpoints(base, experts, weights, tmp_path / "a", MergeOptions(method="svd", extra={"fisher": files}))
    with pytest.raises(DmoError, match="no fisher weights given for expert 'e1'"):
        merge_checkpoints(
            base, experts, weights, tmp_path / "a", MergeOptions(method="fisher", extra={"fisher": {"e0": files["e0"]}})
        )
    fisher_e1 = load_model(files["e1"])
    fisher_e1["model.norm.weight"] = torch.ones(3)
    save_file(fisher_e1, str(files["e1"] / "fisher_weights.safetensors"))
    with pytest.raises(DmoError, match=r"fisher weights of expert 'e1' give model.norm.weight the shape \[3\]"):
        merge_checkpoints(
            base, experts, weights, tmp_path / "a", MergeOptions(method="fisher", extra={"fisher": files})
        )
    del fisher_e1["model.norm.weight"]
    save_file(fisher_e1, str(files["e1"] / "fisher_weights.safetensors"))
    with pytest.raises(DmoError, match="fisher weights of expert 'e1' .* have no tensor for model.norm.weight"):
        merge_checkpoints(
            base, experts, weights, tmp_path / "a", MergeOptions(method="fisher_nn", extra={"fisher": files})
        )
    assert not (tmp_path / "a").exists()


# ------------------------------------------------------------------------------------------------------- live bank


def test_live_bank_merges_matrix_and_fisher_methods_like_the_stream(tmp_path: Path) -> None:
    base, experts = make_set(tmp_path, torch.bfloat16, n=3, shards=2, seed=6)
    files = _fisher_files(tmp_path, experts, 70)
    bank = ExpertBank.open(base, experts, extra={"fisher": files})
    weights = {"e0": 0.6, "e2": 0.4}  # e1 not in this mixture
    cases = [("svd", {"weighted": False}), ("iso", {}), ("wudi", {"iterations": 30}), ("fisher", {})]
    for method, params in cases:
        out = tmp_path / f"out-{method}"
        merge_checkpoints(
            base,
            experts,
            weights,
            out,
            MergeOptions(
                method=method, params=params, exclude=[], extra={"fisher": files} if method == "fisher" else None
            ),
        )
        proxy = load_model(base) | {k: v.cpu() for k, v in bank.merged(weights, method, params)}
        assert_same_model(proxy, load_model(out))
    with pytest.raises(DmoError, match="needs the fisher weights of every expert"):
        dict(ExpertBank.open(base, experts).merged(weights, "fisher_nn"))


def test_a_method_declares_its_parameters_once() -> None:
    """The chunked form takes the function's parameters without defaults of its own (dare's normalize=False and
    dare_ties' normalize=True reach the stream as the functions declare them); a form that disagrees is refused."""
    assert registry.get_method("ties").make_chunked(torch.ones(2), 6, "x", {}).density == 0.2
    assert registry.get_method("dare").make_chunked(torch.ones(2), 6, "x", {}).normalize is False
    assert registry.get_method("dare_ties").make_chunked(torch.ones(2), 6, "x", {}).normalize is True

    class OwnDefault(registry.Chunked):
        def __init__(self, weights, numel, name="", *, scale: float = 2.0):
            super().__init__(weights, numel, name)

        def merge(self, deltas, lo):
            return deltas.sum(0)

    def fn(deltas, weights, scale: float = 1.0):
        return deltas.sum(0)

    with pytest.raises(DmoError, match="gives 'scale' a default of its own"):
        registry.merge_method("own_default_test", chunked=OwnDefault)(fn)

    def other(deltas, weights, density: float = 1.0):
        return deltas.sum(0)

    with pytest.raises(DmoError, match="takes \\['scale'\\] but its function \\['density'\\]"):
        registry.merge_method("mismatch_test", chunked=OwnDefault)(other)
    assert "own_default_test" not in registry.method_names() and "mismatch_test" not in registry.method_names()


def test_capabilities_are_fields_of_the_registry_entry() -> None:
    """Which methods stream as a weighted sum and which merge one expert into itself: asked of the entry."""
    linear = {m for m in registry.method_names() if registry.get_method(m).lora_exact}
    assert linear == {"linear", "task_arithmetic", "weight_average"}
    assert registry.get_method("linear").linear_coefficients({"a": 0.5, "b": 0.25}, {"scale": 2.0}) == {
        "a": 1.0,
        "b": 0.5,
    }
    assert registry.get_method("weight_average").linear_coefficients({"a": 3.0, "b": 1.0}, {}) == {"a": 0.75, "b": 0.25}
    assert registry.get_method("ties").linear_coefficients({"a": 1.0}, {}) is None
    assert set(registry.expert_at_vertex_methods()) == linear
