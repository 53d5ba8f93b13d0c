"""Every merge method against an independent reference: plain torch here, and peft's merge_utils.

Semantics shared with peft (weights all 1): ties, dare_linear, dare_ties, magnitude_prune,
task_arithmetic. Where they differ: peft elects TIES signs from the unweighted trimmed
vectors and divides by the count of agreeing entries; mergeguard (like mergekit) elects from
the weighted vectors and divides by the agreeing entries' summed weights. With unit weights
the two are identical; non-unit weights are checked against the plain-torch reference.
"""

from __future__ import annotations

import math

import pytest
import torch
from peft.utils import merge_utils as peft_merge

from mergeguard.errors import MergeguardError
from mergeguard.merge.base import TensorContext
from mergeguard.merge.methods import dare_seed, layer_of, vector_thresholds
from mergeguard.merge.registry import get_method


def _deltas(n=3, shape=(40, 25), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * (i + 1) for i in range(n)]


def run(name, deltas, weights=None, tensor="layer.resblocks.0.w", seed=0, state=None, **params):
    method = get_method(name)
    weights = torch.ones(len(deltas)) if weights is None else torch.tensor(weights, dtype=torch.float32)
    ctx = TensorContext(name=tensor, inputs=list(range(len(deltas))), seed=seed, state=state)
    return method.fn([d.clone() for d in deltas], weights, ctx, **method.resolve(params))


def test_task_arithmetic_matches_plain_torch_and_peft():
    d = _deltas()
    w = [1.0, 0.5, 2.0]
    expected = 0.3 * (d[0] + 0.5 * d[1] + 2.0 * d[2])
    got = run("task_arithmetic", d, w)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got, 0.3 * peft_merge.task_arithmetic(d, torch.tensor(w)))


def test_average_is_mean_of_finetuned_models():
    base = torch.randn(40, 25)
    d = _deltas()
    w = [1.0, 3.0, 0.5]
    finetuned = [base + x for x in d]
    expected = sum(wi * f for wi, f in zip(w, finetuned)) / sum(w)
    torch.testing.assert_close(base + run("average", d, w), expected)


def _topk_trim(t, density):
    k = int(density * t.numel())
    mask = torch.zeros(t.numel())
    mask[t.abs().reshape(-1).topk(k).indices] = 1
    return t * mask.view_as(t)


def _ties_reference(deltas, weights, density, normalize, trim=_topk_trim):
    """TIES in plain torch, following the paper with mergekit's weighting."""
    trimmed = torch.stack([trim(d, density) for d in deltas])
    w = torch.tensor(weights).view(-1, 1, 1)
    weighted = trimmed * w
    sign = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    agree = (weighted.sign() == sign).float()
    out = (weighted * agree).sum(0)
    if normalize == "mean":
        div = (w * agree).sum(0)
        out = out / torch.where(div == 0, torch.ones_like(div), div)
    return out


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_mean_matches_peft_with_unit_weights(density):
    d = _deltas()
    got = run("ties", d, density=density, lam=1.0)
    torch.testing.assert_close(got, peft_merge.ties(d, torch.ones(3), density))


@pytest.mark.parametrize("normalize", ["mean", "sum"])
def test_ties_with_weights_matches_reference(normalize):
    d = _deltas(4)
    w = [1.0, 0.25, 2.0, 0.7]
    got = run("ties", d, w, density=0.3, normalize=normalize, lam=0.3)
    torch.testing.assert_close(got, 0.3 * _ties_reference(d, w, 0.3, normalize))


@pytest.mark.parametrize("normalize", ["sum", "mean"])
@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0, 1.0], [1.0, -0.5, 2.0, -1.5]])
@pytest.mark.parametrize("density", [1e-4, 0.3, 1.0])  # 1e-4: no entry kept (k = 0)
def test_ties_in_one_pass_equals_trim_then_elect(weights, density, normalize):
    """TIES fuses trim, election and merge; the same numbers as the two-step path (bit for bit with unit
    weights) and as the plain-torch reference, with ties at the threshold, negative weights (a forget merge) and
    the whole vector's thresholds."""
    from mergeguard.merge.methods import _trimmed, sign_consensus

    d = _deltas(4)
    d[1][:5] = d[1].flatten().abs().sort().values[int(0.7 * d[1].numel())]  # entries equal to the threshold
    w = torch.tensor(weights)
    for state in (None, {"thresholds": [0.5, 1.0, float("inf"), 0.0]}):
        got = run("ties", d, weights, density=density, normalize=normalize, lam=1.0, state=state)
        ctx = TensorContext(name="x", inputs=[0, 1, 2, 3], seed=0, state=state)
        two_step = sign_consensus(_trimmed([x.clone() for x in d], ctx, density), w.clone(), normalize)
        if weights[1] == 1.0:
            assert torch.equal(got, two_step)
        torch.testing.assert_close(got, two_step)
        if state is None:
            torch.testing.assert_close(got, _ties_reference(d, weights, density, normalize, trim=_at_least_kth))


def _at_least_kth(t, density):
    """Keep every entry at least as large as the k-th largest magnitude (ties at the threshold kept)."""
    k = int(density * t.numel())
    if k == 0:
        return torch.zeros_like(t)
    kth = t.abs().reshape(-1).topk(k).values.min()
    return t * (t.abs() >= kth)


def test_magnitude_prune_matches_peft():
    d = _deltas()
    w = torch.tensor([1.0, 0.5, 2.0])
    got = run("magnitude_prune", d, w.tolist(), density=0.25, lam=1.0)
    torch.testing.assert_close(got, peft_merge.magnitude_prune(d, w, 0.25))


def _peft_dare_pruned(deltas, density, tensor, seed):
    out = []
    for i, d in enumerate(deltas):
        torch.manual_seed(dare_seed(seed, tensor, i))  # peft draws from the global generator
        out.append(peft_merge.prune(d, density, "random", rescale=True))
    return out


def test_dare_linear_matches_peft_with_the_same_masks():
    d = _deltas()
    w = torch.tensor([1.0, 0.5, 2.0])
    got = run("dare_linear", d, w.tolist(), density=0.4, lam=1.0, seed=7)
    expected = peft_merge.task_arithmetic(_peft_dare_pruned(d, 0.4, "layer.resblocks.0.w", 7), w)
    torch.testing.assert_close(got, expected)


def test_dare_ties_matches_peft_with_the_same_masks():
    d = _deltas()
    got = run("dare_ties", d, density=0.4, lam=1.0, seed=3)
    pruned = torch.stack(_peft_dare_pruned(d, 0.4, "layer.resblocks.0.w", 3))
    mask = peft_merge.calculate_majority_sign_mask(pruned, "total")
    torch.testing.assert_close(got, peft_merge.disjoint_merge(pruned, mask))


def test_dare_is_reproducible_and_seeded():
    d = _deltas()
    a = run("dare_linear", d, seed=1)
    torch.testing.assert_close(a, run("dare_linear", d, seed=1))
    assert not torch.allclose(a, run("dare_linear", d, seed=2))
    kept = (run("dare_linear", [d[0]], density=0.3, lam=1.0) != 0).float().mean().item()
    assert abs(kept - 0.3) < 0.05


def _breadcrumbs_reference(t, density, gamma):
    n = t.numel()
    n_top = int(gamma * n)
    n_bottom = n - int(density * n) - n_top
    if n_bottom < 0:
        n_top, n_bottom = n_top + n_bottom, 0
    order = t.abs().reshape(-1).argsort()
    mask = torch.zeros(n)
    mask[order[n_bottom: n - n_top]] = 1
    return t * mask.view_as(t)


@pytest.mark.parametrize(("density", "gamma"), [(0.9, 0.01), (0.5, 0.1), (0.95, 0.1)])
def test_breadcrumbs_matches_sort_reference(density, gamma):
    d = _deltas()
    w = [1.0, 0.5, 2.0]
    got = run("breadcrumbs", d, w, density=density, gamma=gamma, lam=0.5)
    expected = 0.5 * sum(wi * _breadcrumbs_reference(x, density, gamma) for wi, x in zip(w, d))
    torch.testing.assert_close(got, expected)


def test_vector_thresholds_equal_topk_over_the_whole_vector():
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{j}": [torch.randn(n, generator=g) * s for s in (1.0, 0.01)] for j, n in enumerate((500, 37, 2000))}

    def passes():
        for name, ds in tensors.items():
            yield name, ds, [0, 1], None

    for density in (0.2, 0.013, 0.5, 1.0):
        thr = vector_thresholds(passes, 2, density)
        for i in range(2):
            flat = torch.cat([ds[i] for ds in tensors.values()]).abs()
            k = int(density * flat.numel())
            assert thr[i] == flat.topk(k).values[-1].item()
            assert int((flat >= thr[i]).sum()) == k
    assert vector_thresholds(passes, 2, 1e-6) == [math.inf, math.inf]


def test_lata_matches_plain_torch():
    names = [f"enc.resblocks.{i}.w" for i in range(4)] + ["head.w"]
    g = torch.Generator().manual_seed(0)
    ref = {n: torch.randn(6, 5, generator=g) for n in names}
    # input 0 is aligned with the reference in layers 0-1, input 1 in layers 2-3
    deltas = {n: [ref[n] * (1.0 if i < 2 else 0.0) + torch.randn(6, 5, generator=g) * 0.5,
                  ref[n] * (0.0 if i < 2 else 1.0) + torch.randn(6, 5, generator=g) * 0.5]
              for i, n in enumerate(names)}
    method = get_method("lata")

    def passes():
        for n in names:
            yield n, deltas[n], [0, 1], ref[n]

    for mode in ("mask", "weighted"):
        params = method.resolve({"mode": mode, "keep": 0.5, "lam": 1.0})
        state = method.prepare(passes, 2, params)
        layers = [layer_of(n) for n in names[:4]]
        for i in range(2):
            cos = {layer_of(n): torch.nn.functional.cosine_similarity(
                deltas[n][i].reshape(1, -1), ref[n].reshape(1, -1)).item() for n in names[:4]}
            if mode == "mask":
                kept = sorted(layers, key=cos.get)[:2]
                expected_w = {layer: float(layer in kept) for layer in layers}
            else:
                raw = {layer: max(0.0, 1 - c) for layer, c in cos.items()}
                mean = sum(raw.values()) / 4
                expected_w = {layer: v / mean for layer, v in raw.items()}
            for layer in layers:
                assert state["layer_weights"][i, layer] == pytest.approx(expected_w[layer], abs=1e-5)
        for n in names:
            ctx = TensorContext(name=n, inputs=[0, 1], state=state)
            got = method.fn(deltas[n], torch.ones(2), ctx, **params)
            layer = layer_of(n)
            w = [state["layer_weights"][i, layer] if layer else 1.0 for i in range(2)]
            torch.testing.assert_close(got, w[0] * deltas[n][0] + w[1] * deltas[n][1])
    # the task-specific layers survive the mask: input 0 keeps layers 2-3, input 1 keeps 0-1
    params = method.resolve({"mode": "mask", "keep": 0.5})
    state = method.prepare(passes, 2, params)
    assert [state["layer_weights"][0, f"enc.resblocks.{i}"] for i in range(4)] == [0, 0, 1, 1]
    assert [state["layer_weights"][1, f"enc.resblocks.{i}"] for i in range(4)] == [1, 1, 0, 0]


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_density_outside_unit_interval_is_rejected(bad):
    with pytest.raises(MergeguardError, match=r"density for ties must be in \(0, 1\]"):
        get_method("ties").resolve({"density": bad})


def test_unknown_parameter_and_method():
    with pytest.raises(MergeguardError, match="--gamma is not a parameter of ties"):
        get_method("ties").resolve({"gamma": 0.1})
    with pytest.raises(MergeguardError, match="unknown merge method"):
        get_method("frankenmerge")
    with pytest.raises(MergeguardError, match="one of mean, sum"):
        get_method("ties").resolve({"normalize": "median"})


def test_layer_names():
    assert layer_of("visual.transformer.resblocks.3.mlp.c_fc.weight") == "visual.transformer.resblocks.3"
    assert layer_of("model.layers.12.self_attn.q_proj.weight") == "model.layers.12"
    assert layer_of("h.0.attn.c_attn.weight") == "h.0"
    assert layer_of("visual.conv1.patch.0.weight") is None  # 'patch' is no layer keyword
    assert layer_of("ln_post.weight") is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kth_largest_on_an_accelerator_path_equals_the_cpu_path_and_a_sort(dtype):
    """`_kth_largest` selects with numpy on the CPU and with torch.topk where an accelerator's tensor lives;
    the topk path runs here on the CPU tensor itself: both equal a plain descending sort's k-th entry, ties
    and repeated values included."""
    from mergeguard.merge.methods import _kth_largest, _kth_largest_topk

    g = torch.Generator().manual_seed(3)
    for n in (1, 7, 1000, 4097):
        values = torch.randn(n, generator=g).abs().to(dtype)
        values[: n // 3] = values[0]  # repeated magnitudes
        for k in sorted({1, max(1, n // 5), n}):
            expected = float(values.float().sort(descending=True).values[k - 1])
            assert _kth_largest_topk(values, k) == expected
            assert _kth_largest(values.clone(), k) == expected
            assert _kth_largest(values.float().clone(), k, scratch=True) == expected


# -- spectral merges (Iso-C, TSV-M): the papers' equations in plain torch, and their closed forms -------------
def test_iso_c_is_the_summed_matrix_with_its_mean_singular_value():
    d = _deltas(3, (30, 20))
    m = d[0] + d[1] + d[2]
    u, s, vh = torch.linalg.svd(m, full_matrices=False)  # M = U S Vᵀ (the paper's eq. 7: S -> mean(S) I)
    expected = 1.5 * s.mean() * (u @ vh)
    got = run("iso_c", d, lam=1.5)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # the closed form: one singular value, repeated, and the summed matrix's singular subspace
    sv = torch.linalg.svdvals(got)
    torch.testing.assert_close(sv, torch.full_like(sv, 1.5 * float(s.mean())), rtol=1e-4, atol=1e-5)
    # a bias (not a matrix) is the task vectors' mean, scaled
    b = _deltas(3, (20,))
    torch.testing.assert_close(run("iso_c", b), (b[0] + b[1] + b[2]) / 3, rtol=1e-6, atol=1e-6)


def test_tsv_m_of_tasks_in_orthogonal_subspaces_is_their_sum():
    """Two rank-2 tasks on disjoint coordinates of a 4x4 matrix: each keeps its top 4/2 = 2 singular
    triplets (all of it), the stacked bases are already orthonormal, so TSV-M is plain task arithmetic."""
    g = torch.Generator().manual_seed(4)
    t1, t2 = torch.zeros(4, 4), torch.zeros(4, 4)
    t1[:2, :2] = torch.randn(2, 2, generator=g)
    t2[2:, 2:] = torch.randn(2, 2, generator=g)
    torch.testing.assert_close(run("tsv_m", [t1, t2]), t1 + t2, rtol=1e-5, atol=1e-6)


def test_tsv_m_matches_the_papers_construction():
    d = _deltas(3, (24, 18), seed=2)
    k = 18 // 3
    svds = [torch.linalg.svd(x, full_matrices=False) for x in d]
    u_stack = torch.cat([u[:, :k] for u, _, _ in svds], dim=1)
    s_stack = torch.cat([s[:k] for _, s, _ in svds])
    v_stack = torch.cat([vh[:k] for _, _, vh in svds], dim=0)
    pu, _, qu = torch.linalg.svd(u_stack, full_matrices=False)  # whitening: the nearest orthonormal bases
    pv, _, qv = torch.linalg.svd(v_stack, full_matrices=False)
    expected = 0.7 * (pu @ qu) @ torch.diag(s_stack) @ (pv @ qv)
    got = run("tsv_m", d, lam=0.7)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    u_orth = pu @ qu
    torch.testing.assert_close(u_orth.T @ u_orth, torch.eye(u_orth.shape[1]), rtol=0, atol=1e-5)
    c = _deltas(3, (7,))
    torch.testing.assert_close(run("tsv_m", c, lam=2.0), 2.0 * (c[0] + c[1] + c[2]) / 3, rtol=1e-6, atol=1e-6)


def test_iso_cts_matches_the_papers_construction():
    """Iso-CTS per the paper (Algorithm 1), in plain torch: the rank r split into a common subspace of
    k = r − T·s directions of the summed matrix (k ≈ 0.8 r, r − k a multiple of T) and s = (r − k)/T directions
    per task taken from its matrix with the common subspace projected out; the bases stacked task-specific
    first (the paper's order; the product does not depend on it), orthonormalised, one singular value."""
    d = _deltas(3, (24, 20), seed=5)
    r, t = 20, 3
    k = int(r * 0.8)
    s_task = round((r - k) / t)
    k = r - t * s_task  # 20 - 3·1 = 17
    u, sv, vh = torch.linalg.svd(d[0] + d[1] + d[2], full_matrices=False)
    uc, sc, vc = u[:, :k], sv[:k], vh[:k]
    parts_u, parts_s, parts_v = [], [], []
    for x in d:
        residual = (torch.eye(24) - uc @ uc.T) @ x
        ut, st, vt = torch.linalg.svd(residual, full_matrices=False)
        parts_u.append(ut[:, :s_task])
        parts_s.append(st[:s_task])
        parts_v.append(vt[:s_task])
    big_u = torch.cat([*parts_u, uc], dim=1)
    big_v = torch.cat([*parts_v, vc], dim=0)
    sigma = torch.cat([*parts_s, sc]).mean()
    pu, _, qu = torch.linalg.svd(big_u, full_matrices=False)
    pv, _, qv = torch.linalg.svd(big_v, full_matrices=False)
    expected = 1.3 * sigma * (pu @ qu) @ (pv @ qv)
    got = run("iso_cts", d, lam=1.3)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # isotropic: every singular value of the merged matrix is that one value
    svals = torch.linalg.svdvals(got)
    torch.testing.assert_close(svals, torch.full_like(svals, 1.3 * float(sigma)), rtol=1e-4, atol=1e-5)
    # the whole rank in the common subspace is Iso-C
    torch.testing.assert_close(run("iso_cts", d, common=1.0), run("iso_c", d), rtol=1e-4, atol=1e-5)
    # a bias is the task vectors' mean
    b = _deltas(3, (9,))
    torch.testing.assert_close(run("iso_cts", b), (b[0] + b[1] + b[2]) / 3, rtol=1e-6, atol=1e-6)


def test_spectral_merges_through_the_engine(family, tmp_path):
    """The CLI's merge with --method iso_c / tsv_m: matrices get the SVD treatment, the rest the mean, integer
    buffers are copied, and the default scale is 1."""
    from safetensors.torch import load_file

    from mergeguard.checkpoint import open_checkpoint
    from mergeguard.merge import merge_checkpoints

    b = family["base"]
    for name in ("iso_c", "iso_cts", "tsv_m"):
        merge_checkpoints(open_checkpoint(family["base_path"]), [open_checkpoint(p) for p in family["paths"]],
                          name, out=tmp_path / f"{name}.safetensors")
        out = load_file(tmp_path / f"{name}.safetensors")
        deltas = {k: [ft[k] - b[k] for ft in family["fts"]] for k in b if b[k].is_floating_point()}
        for k, ds in deltas.items():
            expected = run(name, ds)
            torch.testing.assert_close(out[k] - b[k], expected, rtol=1e-4, atol=1e-5)
            if ds[0].dim() != 2:
                torch.testing.assert_close(out[k] - b[k], sum(ds) / len(ds), rtol=1e-4, atol=1e-5)
        assert torch.equal(out["position_ids"], b["position_ids"])
