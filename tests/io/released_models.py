#!/usr/bin/env python3
"""Released models' routers: moe-routers against each family's gate, re-implemented in PyTorch.

For every model family of moe/io/released_models.hpp this script writes a small synthetic
checkpoint in that family's tensor names, layout and dtype (BF16, F16 or F32), its config.json
and hidden states, using nothing but struct and json; runs the C++ driver
tests/io/released_models.cpp on it; and compares the experts it chose (exactly) and their combine
weights (within a tolerance derived from float epsilon) with the family's routing written here
in PyTorch after the model code in huggingface/transformers (src/transformers/models/<family>/
modeling_<family>.py). The reference runs in float64 on the stored (rounded) weights, and breaks
ties to the lowest expert index with a stable sort (torch.topk promises no order among equals).

Cases: per family a random layer and a layer with exact ties (identical router rows); DeepSeek-V3
also a layer whose biased scores are all negative (a masked group must count as -inf, not 0) and
a check that its selection-only bias never enters a weight; Llama 4 a layer with saturated
logits (ranked by logit, not by sigmoid). Then the experts' projections (transposed into the
library's blocks) and the loading errors: a missing gate, a gate of the wrong shape, a config
that contradicts the router, a missing selection bias, a missing shard; each must leave the
router as it was.

    /usr/bin/python3 released_models.py <path of the released_models binary>

Exit status: 0 when everything agrees, 1 on a mismatch, 77 when torch cannot be imported.
"""
import json
import os
import subprocess
import sys
import tempfile

try:
    import torch
except ImportError as error:  # a machine without torch: skipped, not passed
    print(f"released_models: skipped, torch cannot be imported ({error})")
    sys.exit(77)

from safetensors_format import DTYPES, read_safetensors, write_safetensors  # noqa: E402 (after torch)

torch.set_default_dtype(torch.float64)
EPS32 = torch.finfo(torch.float32).eps
T = 48  # tokens per layer


def weight_tol(dim, experts, scale=1.0):
    """A combine weight: a length-dim dot product in float (logits), then a softmax or sigmoid
    over at most `experts` values and a renormalisation: a few float roundings per term."""
    return 16 * (dim + experts) * EPS32 * max(1.0, scale)


def forward_tol(n):
    return 8 * n * EPS32


# ---- safetensors with the standard library ---------------------------------------------------

def stored(tensor, dtype):
    """The tensor as the checkpoint holds it: rounded to `dtype`, back in float64."""
    return tensor.to(DTYPES[dtype][0]).to(torch.float64)


def write_checkpoint(directory, tensors, config, shards=1):
    """The tensors in `shards` files with an index when more than one, and config.json."""
    os.makedirs(directory, exist_ok=True)
    names = list(tensors)
    if shards == 1:
        write_safetensors(os.path.join(directory, "model.safetensors"), tensors)
    else:
        weight_map = {}
        for s in range(shards):
            file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[s::shards]}
            write_safetensors(os.path.join(directory, file), part)
            weight_map.update({n: file for n in part})
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


# ---- the families' routing in PyTorch --------------------------------------------------------

def stable_topk(values, k):
    """Indices of the k largest per row, ties to the lowest index (a stable descending sort)."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[:, :k]


def dense(indices, weights, experts):
    """[T, k] choices -> [T, E] chosen mask and weights."""
    chosen = torch.zeros(indices.shape[0], experts)
    w = torch.zeros(indices.shape[0], experts)
    chosen.scatter_(1, indices, 1.0)
    w.scatter_(1, indices, weights)
    return chosen, w


def kth_gap(rank, k):
    """Smallest gap between the k-th and (k+1)-th largest rank value of each row, leaving out
    exact ties (deliberate): where float rounding could pick another expert than float64."""
    ordered = torch.sort(rank, dim=-1, descending=True).values
    if k >= rank.shape[1]:
        return float("inf")
    gap = ordered[:, k - 1] - ordered[:, k]
    gap = gap[gap != 0]
    gap = gap[torch.isfinite(gap)]
    return gap.min().item() if gap.numel() else float("inf")


def route(family, cfg, x, p):
    """Returns (chosen [T, E], weights [T, E], near-tie gaps [(gap, scale)]) for one layer.
    p: the layer's stored router tensors (float64)."""
    E, k = cfg["experts"], cfg["k"]
    logits = x @ p["weight"].t()
    if family == "gpt_oss":
        logits = logits + p["bias"]
    gaps = []
    if family in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "dbrx"):
        # MixtralSparseMoeBlock / Qwen2MoeSparseMoeBlock / OlmoeSparseMoeBlock / DbrxRouter:
        # softmax over E (fp32), top-k of the probabilities, then the family's normalisation.
        probs = torch.softmax(logits, dim=-1)
        idx = stable_topk(probs, k)
        w = probs.gather(1, idx)
        if family == "mixtral" or (family != "dbrx" and cfg["norm_topk_prob"]):
            w = w / w.sum(dim=-1, keepdim=True)
        if family == "dbrx" and cfg["normalize_p"] is not None:
            w = w / torch.norm(w, p=cfg["normalize_p"], dim=-1, keepdim=True)
        gaps.append(kth_gap(probs, k))
    elif family == "deepseek_v2":
        # DeepseekV2Moe.route_tokens_to_experts: softmax; greedy top-k, or the group-limited
        # greedy: a group scores its max, keep topk_group groups, the others' scores set to 0;
        # weights = scores x routed_scaling_factor (no renormalisation in the released configs).
        probs = torch.softmax(logits, dim=-1)
        if cfg["topk_method"] == "group_limited_greedy":
            G, keep = cfg["groups"], cfg["groups_kept"]
            group_scores = probs.view(-1, G, E // G).max(dim=-1).values
            groups = stable_topk(group_scores, keep)
            mask = torch.zeros_like(group_scores).scatter_(1, groups, 1.0)
            mask = mask.unsqueeze(-1).expand(-1, G, E // G).reshape(-1, E)
            ranked = probs.masked_fill(mask == 0, 0.0)
            gaps.append(kth_gap(group_scores, keep))
        else:
            ranked = probs
        idx = stable_topk(ranked, k)
        w = probs.gather(1, idx)
        if cfg["norm_topk_prob"]:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        w = w * cfg["routed_scaling_factor"]
        gaps.append(kth_gap(ranked, k))
    elif family == "deepseek_v3":
        # DeepseekV3TopkRouter: s = sigmoid(logits); c = s + e_score_correction_bias ranks only;
        # a group scores the sum of its top-2 c; keep topk_group groups, the others' c at -inf;
        # top-k of c; weights = s at the chosen, / (sum + 1e-20) if norm_topk_prob, x factor.
        G, keep = cfg["groups"], cfg["groups_kept"]
        scores = torch.sigmoid(logits)
        c = scores + p["expert_bias"]
        group_scores = c.view(-1, G, E // G).topk(2, dim=-1).values.sum(dim=-1)
        groups = stable_topk(group_scores, keep)
        mask = torch.zeros_like(group_scores).scatter_(1, groups, 1.0)
        mask = mask.unsqueeze(-1).expand(-1, G, E // G).reshape(-1, E)
        ranked = c.masked_fill(mask == 0, float("-inf"))
        idx = stable_topk(ranked, k)
        w = scores.gather(1, idx)
        if cfg["norm_topk_prob"]:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        w = w * cfg["routed_scaling_factor"]
        gaps += [kth_gap(group_scores, keep), kth_gap(ranked, k)]
    elif family == "gpt_oss":
        # GptOssTopKRouter: top-k of the biased logits, softmax over those k.
        idx = stable_topk(logits, k)
        w = torch.softmax(logits.gather(1, idx), dim=-1)
        gaps.append(kth_gap(logits, k))
    elif family == "llama4":
        # Llama4Router: top-k of the logits, sigmoid of the chosen logits, no normalisation.
        idx = stable_topk(logits, k)
        w = torch.sigmoid(logits.gather(1, idx))
        gaps.append(kth_gap(logits, k))
    else:
        raise ValueError(family)
    chosen, weights = dense(idx, w, E)
    return chosen, weights, gaps, logits


# ---- the families' checkpoints ---------------------------------------------------------------

def layer_prefix(family, layer, text_only=False):
    if family == "dbrx":
        return f"transformer.blocks.{layer}."
    if family == "llama4" and not text_only:
        return f"language_model.model.layers.{layer}."
    return f"model.layers.{layer}."


def router_names(family, layer, text_only=False):
    p = layer_prefix(family, layer, text_only)
    return {
        "mixtral": {"weight": p + "block_sparse_moe.gate.weight"},
        "qwen2_moe": {"weight": p + "mlp.gate.weight"},
        "qwen3_moe": {"weight": p + "mlp.gate.weight"},
        "olmoe": {"weight": p + "mlp.gate.weight"},
        "deepseek_v2": {"weight": p + "mlp.gate.weight"},
        "deepseek_v3": {"weight": p + "mlp.gate.weight", "expert_bias": p + "mlp.gate.e_score_correction_bias"},
        "dbrx": {"weight": p + "ffn.router.layer.weight"},
        "gpt_oss": {"weight": p + "mlp.router.weight", "bias": p + "mlp.router.bias"},
        "llama4": {"weight": p + "feed_forward.router.weight"},
    }[family]


def expert_names(family, layer, e):
    p = layer_prefix(family, layer)
    if family == "mixtral":
        q = p + f"block_sparse_moe.experts.{e}."
        return q + "w1.weight", q + "w3.weight", q + "w2.weight"
    q = p + f"mlp.experts.{e}."
    return q + "gate_proj.weight", q + "up_proj.weight", q + "down_proj.weight"


def shared_names(family, layer):
    q = layer_prefix(family, layer) + ("mlp.shared_expert." if family == "qwen2_moe" else "mlp.shared_experts.")
    return q + "gate_proj.weight", q + "up_proj.weight", q + "down_proj.weight"


def shared_gate_name(layer):
    return layer_prefix("qwen2_moe", layer) + "mlp.shared_expert_gate.weight"


class Case:
    """One family's checkpoint: config.json fields, the MoE layers, and per layer the router
    tensors and hidden states, with a kind: random, ties, negative (V3), saturated (Llama 4)."""

    def __init__(self, name, family, cfg, config, layers, dtype, seed, shards=1, text_only=False, experts=None):
        self.name, self.family, self.cfg, self.config = name, family, cfg, config
        self.layers, self.dtype, self.shards, self.text_only = layers, dtype, shards, text_only
        self.experts_hidden = experts  # expert width when the case also writes the experts
        self.gen = torch.Generator().manual_seed(seed)

    def randn(self, *shape, scale=1.0):
        return torch.randn(*shape, generator=self.gen, dtype=torch.float64) * scale

    def build(self, directory):
        E, D = self.cfg["experts"], self.cfg["dim"]
        tensors, params, hidden = {}, {}, {}
        # Tensors every real checkpoint has, which the loader must leave alone.
        tensors["model.embed_tokens.weight"] = (self.randn(5, D), self.dtype)
        for layer, kind in self.layers.items():
            names = router_names(self.family, layer, self.text_only)
            w = self.randn(E, D, scale=D ** -0.5)
            x = self.randn(T, D)
            if kind == "ties":
                # experts 1, E/2 + 1 and E - 1 share one strong row: their logits are equal for
                # every token, so the lowest index must win wherever the k-th place is shared.
                strong = self.randn(D, scale=3 * D ** -0.5)
                for e in (1, E // 2 + 1, E - 1):
                    w[e] = strong
            if kind == "saturated":
                x = x * 40  # logits of tens: sigmoid is 1.0 in float for all the top ones
            p = {"weight": stored(w, self.dtype)}
            tensors[names["weight"]] = (w, self.dtype)
            if "bias" in names:
                b = self.randn(E, scale=0.5)
                p["bias"] = stored(b, self.dtype)
                tensors[names["bias"]] = (b, self.dtype)
            if "expert_bias" in names:
                b = self.randn(E, scale=0.3)  # of the order of the sigmoid scores: it changes choices
                if kind == "negative":
                    b = b - 3.0  # every biased score negative
                p["expert_bias"] = stored(b, "F32")
                tensors[names["expert_bias"]] = (b, "F32")  # fp32 in the released checkpoints
            if self.experts_hidden:
                I = self.experts_hidden
                for e in range(E):
                    for name, shape in zip(expert_names(self.family, layer, e), ((I, D), (I, D), (D, I))):
                        tensors[name] = (self.randn(*shape, scale=shape[1] ** -0.5), self.dtype)
                if self.cfg.get("shared"):
                    S = self.cfg["shared"]
                    for name, shape in zip(shared_names(self.family, layer), ((S, D), (S, D), (D, S))):
                        tensors[name] = (self.randn(*shape, scale=shape[1] ** -0.5), self.dtype)
                    if self.family == "qwen2_moe":
                        tensors[shared_gate_name(layer)] = (self.randn(1, D, scale=D ** -0.5), self.dtype)
            params[layer] = p
            hidden[layer] = x.to(torch.float32).to(torch.float64)
        write_checkpoint(directory, tensors, self.config, self.shards)
        self.tensors, self.params, self.hidden = tensors, params, hidden


def family_cases():
    """Small but structured: groups for DeepSeek, MoE and dense layers, the three dtypes."""
    cases = []
    D = 16
    cases.append(Case("mixtral", "mixtral", {"experts": 8, "k": 2, "dim": D},
                      {"model_type": "mixtral", "hidden_size": D, "num_hidden_layers": 2, "num_local_experts": 8,
                       "num_experts_per_tok": 2, "intermediate_size": 6, "rms_norm_eps": 1e-05,
                       "router_jitter_noise": 0.0, "torch_dtype": "bfloat16"},
                      {0: "random", 1: "ties"}, "BF16", 11, shards=3, experts=6))
    cases.append(Case("qwen2_moe", "qwen2_moe", {"experts": 8, "k": 3, "dim": D, "norm_topk_prob": False, "shared": 10},
                      {"model_type": "qwen2_moe", "hidden_size": D, "num_hidden_layers": 3, "num_experts": 8,
                       "num_experts_per_tok": 3, "norm_topk_prob": False, "decoder_sparse_step": 1,
                       "mlp_only_layers": [1], "moe_intermediate_size": 6, "shared_expert_intermediate_size": 10},
                      {0: "random", 2: "ties"}, "F16", 12, experts=6))
    cases.append(Case("qwen3_moe", "qwen3_moe", {"experts": 8, "k": 2, "dim": 12, "norm_topk_prob": True},
                      {"model_type": "qwen3_moe", "hidden_size": 12, "num_hidden_layers": 2, "num_experts": 8,
                       "num_experts_per_tok": 2, "norm_topk_prob": True, "decoder_sparse_step": 1,
                       "mlp_only_layers": [], "moe_intermediate_size": 6},
                      {0: "random", 1: "ties"}, "F32", 13))
    cases.append(Case("deepseek_v2_lite", "deepseek_v2",
                      {"experts": 8, "k": 3, "dim": D, "norm_topk_prob": False, "routed_scaling_factor": 1.5,
                       "topk_method": "greedy"},
                      {"model_type": "deepseek_v2", "hidden_size": D, "num_hidden_layers": 3, "n_routed_experts": 8,
                       "num_experts_per_tok": 3, "norm_topk_prob": False, "routed_scaling_factor": 1.5,
                       "topk_method": "greedy", "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
                       "moe_layer_freq": 1, "n_shared_experts": 2, "moe_intermediate_size": 6, "scoring_func": "softmax"},
                      {1: "random", 2: "ties"}, "BF16", 14))
    cases.append(Case("deepseek_v2", "deepseek_v2",
                      {"experts": 16, "k": 4, "dim": D, "norm_topk_prob": False, "routed_scaling_factor": 16.0,
                       "topk_method": "group_limited_greedy", "groups": 4, "groups_kept": 2},
                      {"model_type": "deepseek_v2", "hidden_size": D, "num_hidden_layers": 2, "n_routed_experts": 16,
                       "num_experts_per_tok": 4, "norm_topk_prob": False, "routed_scaling_factor": 16.0,
                       "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
                       "first_k_dense_replace": 0, "n_shared_experts": 2, "moe_intermediate_size": 6},
                      {0: "random", 1: "ties"}, "F16", 15))
    cases.append(Case("deepseek_v3", "deepseek_v3",
                      {"experts": 16, "k": 4, "dim": D, "norm_topk_prob": True, "routed_scaling_factor": 2.5,
                       "groups": 4, "groups_kept": 2, "shared": 6},
                      {"model_type": "deepseek_v3", "hidden_size": D, "num_hidden_layers": 4, "n_routed_experts": 16,
                       "num_experts_per_tok": 4, "norm_topk_prob": True, "routed_scaling_factor": 2.5,
                       "topk_method": "noaux_tc", "n_group": 4, "topk_group": 2, "first_k_dense_replace": 1,
                       "n_shared_experts": 1, "moe_intermediate_size": 6, "scoring_func": "sigmoid"},
                      {1: "random", 2: "ties", 3: "negative"}, "BF16", 26, shards=2, experts=6))
    cases.append(Case("olmoe", "olmoe", {"experts": 8, "k": 2, "dim": D, "norm_topk_prob": False},
                      {"model_type": "olmoe", "hidden_size": D, "num_hidden_layers": 2, "num_experts": 8,
                       "num_experts_per_tok": 2, "norm_topk_prob": False, "intermediate_size": 6},
                      {0: "random", 1: "ties"}, "F16", 17))
    cases.append(Case("dbrx", "dbrx", {"experts": 8, "k": 2, "dim": D, "normalize_p": 1.0},
                      {"model_type": "dbrx", "d_model": D, "n_layers": 2,
                       "ffn_config": {"moe_num_experts": 8, "moe_top_k": 2, "moe_normalize_expert_weights": 1,
                                      "ffn_hidden_size": 6, "moe_jitter_eps": 0.01}},
                      {0: "random", 1: "ties"}, "BF16", 28))
    cases.append(Case("gpt_oss", "gpt_oss", {"experts": 8, "k": 2, "dim": D},
                      {"model_type": "gpt_oss", "hidden_size": D, "num_hidden_layers": 2, "num_local_experts": 8,
                       "num_experts_per_tok": 2, "intermediate_size": 6},
                      {0: "random", 1: "ties"}, "BF16", 19))
    llama4_text = {"model_type": "llama4_text", "hidden_size": D, "num_hidden_layers": 4, "num_local_experts": 8,
                   "num_experts_per_tok": 1, "interleave_moe_layer_step": 2, "intermediate_size": 6}
    cases.append(Case("llama4", "llama4", {"experts": 8, "k": 1, "dim": D},
                      {"model_type": "llama4", "text_config": llama4_text, "vision_config": {"hidden_size": 8}},
                      {1: "random", 3: "ties"}, "BF16", 20))
    cases.append(Case("llama4_saturated_text_only", "llama4", {"experts": 8, "k": 1, "dim": D},
                      {"model_type": "llama4", "text_config": dict(llama4_text, interleave_moe_layer_step=1,
                                                                   num_hidden_layers=1)},
                      {0: "saturated"}, "F32", 21, text_only=True))
    return cases


# ---- running and comparing -------------------------------------------------------------------

def run(args):
    result = subprocess.run(args, capture_output=True, text=True)
    return result.returncode, result.stdout + result.stderr


def check_routes(binary, case, tmp):
    directory = os.path.join(tmp, case.name)
    case.build(directory)
    hidden_path = os.path.join(tmp, case.name + ".hidden.safetensors")
    out_path = os.path.join(tmp, case.name + ".out.safetensors")
    write_safetensors(hidden_path, {f"hidden.{l}": (x, "F32") for l, x in case.hidden.items()})
    code, text = run([binary, "route", directory, case.family, hidden_path, out_path])
    if code != 0:
        print(f"  {case.name}: the driver failed ({code}):\n{text}")
        return False
    got = read_safetensors(out_path, torch.float64)
    ok = True
    E, D = case.cfg["experts"], case.cfg["dim"]
    scale = case.cfg.get("routed_scaling_factor", 1.0)
    tol = weight_tol(D, E, scale)
    for layer, kind in case.layers.items():
        chosen, weights, gaps, logits = route(case.family, case.cfg, case.hidden[layer], case.params[layer])
        # A near tie (not an exact one) that float rounding could decide otherwise: a bad seed.
        # Every ranking value (softmax, sigmoid, logit, a sum of two sigmoids) moves by at most
        # as much as the logits, which float computes within forward_tol(D) of float64.
        margin = forward_tol(D) * max(1.0, logits.abs().max().item())
        if min(gaps) <= margin:
            print(f"  {case.name} layer {layer} ({kind}): a near tie {min(gaps):.2e} <= {margin:.2e}: choose another seed")
            ok = False
        c, w = got.get(f"chosen.{layer}"), got.get(f"weights.{layer}")
        if c is None or w is None:
            print(f"  {case.name} layer {layer}: no output for this MoE layer")
            ok = False
            continue
        wrong = (c != chosen).any(dim=1).nonzero().flatten().tolist()
        err = (w - weights).abs().max().item()
        layer_ok = not wrong and err <= tol
        print(f"  {case.name} layer {layer} ({kind}): chosen {'same' if not wrong else f'DIFFER for tokens {wrong[:8]}'}, "
              f"max |w - w_ref| = {err:.2e} (tolerance {tol:.2e})")
        if wrong:
            t = wrong[0]
            print(f"    token {t}: C++ {c[t].nonzero().flatten().tolist()}, PyTorch {chosen[t].nonzero().flatten().tolist()}")
        ok = ok and layer_ok
        if kind == "ties":
            # the tie must have decided something: some token has a tied expert in and one out
            tied = [1, E // 2 + 1, E - 1]
            decided = ((chosen[:, tied].sum(dim=1) > 0) & (chosen[:, tied].sum(dim=1) < 3)).sum().item()
            if decided == 0:
                print("    the tie decided nothing: make the shared row stronger")
                ok = False
        if case.family == "deepseek_v3":
            # The selection bias must not enter a weight: weights from s + b differ from the true
            # ones by far more than the tolerance, so a library that folded b in would fail.
            s = torch.sigmoid(logits)
            biased = (s + case.params[layer]["expert_bias"]) * chosen
            biased = biased / biased.sum(dim=1, keepdim=True) * scale
            if (biased - weights).abs().max().item() <= 10 * tol:
                print("    the bias is too small to tell whether it enters the weights")
                ok = False
        if kind == "negative":
            c_all = s + case.params[layer]["expert_bias"]
            if (c_all < 0).sum().item() != c_all.numel():
                print("    not every biased score is negative")
                ok = False
            # with masked groups at 0 instead of -inf, the choice differs: the case can fail
            G, keep = case.cfg["groups"], case.cfg["groups_kept"]
            gs = c_all.view(-1, G, E // G).topk(2, dim=-1).values.sum(dim=-1)
            mask = torch.zeros_like(gs).scatter_(1, stable_topk(gs, keep), 1.0)
            mask = mask.unsqueeze(-1).expand(-1, G, E // G).reshape(-1, E)
            at_zero = dense(stable_topk(c_all.masked_fill(mask == 0, 0.0), case.cfg["k"]),
                            torch.zeros(T, case.cfg["k"]), E)[0]
            if (at_zero == chosen).all():
                print("    masking at 0 would choose the same: the case cannot tell -inf from 0")
                ok = False
        if kind == "saturated":
            top = torch.sort(logits, dim=1, descending=True).values
            if not (torch.sigmoid(top[:, :2].to(torch.float32)) == 1.0).all(dim=1).any():
                print("    no token has two saturated sigmoids: the case cannot tell logit from sigmoid ranking")
                ok = False
    return ok


def check_experts(binary, case, tmp):
    directory = os.path.join(tmp, case.name)
    layer = next(iter(case.layers))
    x = case.randn(8, case.cfg["dim"]).to(torch.float32).to(torch.float64)
    x_path = os.path.join(tmp, case.name + ".x.safetensors")
    out_path = os.path.join(tmp, case.name + ".experts.safetensors")
    write_safetensors(x_path, {"x": (x, "F32")})
    code, text = run([binary, "experts", directory, case.family, str(layer), x_path, out_path])
    if code != 0:
        print(f"  {case.name} experts: the driver failed ({code}):\n{text}")
        return False
    got = read_safetensors(out_path, torch.float64)
    I = case.experts_hidden

    def mlp(names, width):
        gate, up, down = (stored(case.tensors[n][0], case.dtype) for n in names)
        ref = (torch.nn.functional.silu(x @ gate.t()) * (x @ up.t())) @ down.t()
        return ref, forward_tol(case.cfg["dim"] + width) * max(1.0, ref.abs().max().item())

    ok = True
    worst = 0.0
    for e in range(case.cfg["experts"]):
        ref, tol = mlp(expert_names(case.family, layer, e), I)
        err = (got[f"expert.{e}"] - ref).abs().max().item()
        worst = max(worst, err / tol)
        ok = ok and err <= tol
    line = f"  {case.name} layer {layer}: {case.cfg['experts']} experts, worst error / tolerance = {worst:.2f}"
    if case.cfg.get("shared"):
        ref, tol = mlp(shared_names(case.family, layer), case.cfg["shared"])
        if case.family == "qwen2_moe":
            # Qwen2MoeSparseMoeBlock: sigmoid(shared_expert_gate(x)) * shared_expert(x)
            ref = torch.sigmoid(x @ stored(case.tensors[shared_gate_name(layer)][0], case.dtype).t()) * ref
        err = (got["shared"] - ref).abs().max().item()
        line += f"; shared expert {err / tol:.2f}"
        ok = ok and err <= tol
    print(line + ("" if ok else "  MISMATCH"))
    return ok


def check_errors(binary, cases, tmp):
    """Each bad checkpoint is a good one with one fault; the driver loads the good layer first,
    so a load that wrote anything before failing shows as HALF LOADED."""
    by_name = {c.name: c for c in cases}
    ok = True

    def variant(case_name, suffix, edit_tensors=None, edit_config=None, drop_shard=False):
        case = by_name[case_name]
        directory = os.path.join(tmp, f"{case_name}.{suffix}")
        gen = torch.Generator().manual_seed(99)
        tensors = {n: (torch.randn(t.shape, generator=gen, dtype=torch.float64), d) for n, (t, d) in case.tensors.items()}
        config = json.loads(json.dumps(case.config))
        if edit_tensors:
            edit_tensors(tensors)
        if edit_config:
            edit_config(config)
        write_checkpoint(directory, tensors, config, case.shards)
        if drop_shard:
            os.remove(os.path.join(directory, f"model-00002-of-{case.shards:05d}.safetensors"))
        return directory

    def expect(name, case_name, layer, directory, error_class, fragments):
        nonlocal ok
        case = by_name[case_name]
        code, text = run([binary, "expect-error", os.path.join(tmp, case_name), directory, case.family, str(layer)])
        good = code == 0 and f"error {error_class}:" in text and "untouched" in text
        good = good and all(f in text for f in fragments)
        print(f"  {name}: {'as expected' if good else 'WRONG'}: {text.strip().splitlines()[0][:150]}")
        if not good:
            print("    " + text.replace("\n", "\n    "))
        ok = ok and good

    mixtral_gate = router_names("mixtral", 1)["weight"]
    expect("missing gate (Mixtral layer 1)", "mixtral", 1,
           variant("mixtral", "missing_gate", edit_tensors=lambda t: t.pop(mixtral_gate)),
           "shape_error", [mixtral_gate, "absent", "layer 1"])
    qwen3_gate = router_names("qwen3_moe", 0)["weight"]
    expect("gate of the wrong shape (Qwen3-MoE)", "qwen3_moe", 0,
           variant("qwen3_moe", "wrong_shape",
                   edit_tensors=lambda t: t.__setitem__(qwen3_gate, (torch.zeros(8, 13), "F32"))),
           "shape_error", [qwen3_gate, "[8, 13]", "[8, 12]"])
    expect("config contradicting the router (OLMoE k = 3)", "olmoe", 0,
           variant("olmoe", "k3", edit_config=lambda c: c.__setitem__("num_experts_per_tok", 3)),
           "config_error", ["num_experts_per_tok", "= 3"])
    expect("config contradicting the router (DeepSeek-V3 norm_topk_prob)", "deepseek_v3", 1,
           variant("deepseek_v3", "nonorm", edit_config=lambda c: c.__setitem__("norm_topk_prob", False)),
           "config_error", ["norm_topk_prob"])
    v3_bias = router_names("deepseek_v3", 1)["expert_bias"]
    expect("DeepSeek-V3 without its selection bias: the weight is not written either", "deepseek_v3", 1,
           variant("deepseek_v3", "nobias", edit_tensors=lambda t: t.pop(v3_bias)),
           "shape_error", [v3_bias, "absent"])
    oss_bias = router_names("gpt_oss", 0)["bias"]
    expect("gpt-oss bias of the wrong shape", "gpt_oss", 0,
           variant("gpt_oss", "badbias", edit_tensors=lambda t: t.__setitem__(oss_bias, (torch.zeros(9), "BF16"))),
           "shape_error", [oss_bias, "[9]"])
    expect("missing shard (Mixtral, 3 shards)", "mixtral", 0, variant("mixtral", "noshard", drop_shard=True),
           "io_error", ["missing shard", "model-00002-of-00003"])
    return ok


def main():
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    binary = sys.argv[1]
    cases = family_cases()
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        print("released_models: routes, C++ against each family's gate in PyTorch")
        for case in cases:
            ok = check_routes(binary, case, tmp) and ok
        print("released_models: experts transposed into SwiGLUExperts' blocks")
        for case in cases:
            if case.experts_hidden:
                ok = check_experts(binary, case, tmp) and ok
        print("released_models: loading errors name the tensor and load nothing")
        ok = check_errors(binary, cases, tmp) and ok
    print("released_models: " + ("agree" if ok else "MISMATCH"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
