#!/usr/bin/python3
"""Side-by-side timing of moe-routers and PyTorch CPU on the same shapes, one thread each.

PyTorch is written the usual index-based way (softmax, topk, one-hot cumsum positions, capacity,
index_select / index_add_), as DeepSpeed and GShard implementations do. Our figures come from the
benchmark binary, run here in the same session.

    /usr/bin/python3 bench/compare_pytorch.py [--bench build/bench/bench/moe_bench] [--quick] [--filter REGEX]

Needs Debian's python3-torch (installed for /usr/bin/python3).
"""
import argparse
import json
import math
import re
import subprocess
import time

import torch
import torch.nn.functional as F


def timed(fn, reps):
    """Median seconds of `reps` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def route_token_choice(logits, k, capacity_factor):
    """Top-k with capacity as DeepSpeed/GShard: rank-major first-come positions, weights
    renormalised over the surviving choices, balance loss from the first choices."""
    tokens, experts = logits.shape
    gates = F.softmax(logits, dim=1)
    capacity = math.ceil(k * capacity_factor * tokens / experts)
    top_w, top_i = torch.topk(gates, k, dim=1)
    offset = torch.zeros(experts, dtype=torch.long)
    slots, kept = [], []
    for r in range(k):
        mask = F.one_hot(top_i[:, r], experts)
        location = torch.cumsum(mask, dim=0) - 1 + offset
        offset = offset + mask.sum(dim=0)
        position = (location * mask).sum(dim=1)
        keep = position < capacity
        slots.append(top_i[:, r] * capacity + position)
        kept.append(keep)
    kept = torch.stack(kept, dim=1)
    weights = top_w * kept
    weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).eps)
    aux = experts * torch.sum(gates.mean(dim=0) * F.one_hot(top_i[:, 0], experts).float().mean(dim=0))
    return torch.stack(slots, dim=1), kept, weights, capacity, aux


def cv_squared(x):
    """tensor2tensor's cv_squared: population variance over (mean^2 + 1e-10)."""
    size = x.numel() + 1e-10
    mean = x.sum() / size
    return ((x - mean) ** 2).sum() / size / (mean ** 2 + 1e-10)


def noisy_top_k_gating(x, w_gate, w_noise, k, noise_epsilon=1e-2):
    """Shazeer et al.'s noisy top-k gating in training as tensor2tensor and its PyTorch port write
    it: learned noise, top-(k+1), softmax over the k kept, importance and load (_prob_in_top_k)."""
    clean_logits = x @ w_gate
    noise_stddev = F.softplus(x @ w_noise) + noise_epsilon
    noisy_logits = clean_logits + torch.randn_like(clean_logits) * noise_stddev
    top_logits, top_indices = noisy_logits.topk(k + 1, dim=1)
    gates = torch.zeros_like(noisy_logits).scatter(1, top_indices[:, :k], F.softmax(top_logits[:, :k], dim=1))
    threshold_if_in = top_logits[:, k:k + 1]
    threshold_if_out = top_logits[:, k - 1:k]
    normal = torch.distributions.normal.Normal(0.0, 1.0)
    prob = torch.where(noisy_logits > threshold_if_in,
                       normal.cdf((clean_logits - threshold_if_in) / noise_stddev),
                       normal.cdf((clean_logits - threshold_if_out) / noise_stddev))
    loss = 1e-2 * (cv_squared(gates.sum(0)) + cv_squared(prob.sum(0)))
    return gates, loss


def vmoe_capacity(tokens, experts, capacity_factor):
    """vmoe compute_capacity: ceil(T cf / E), then up to a multiple of 4."""
    capacity = math.ceil(tokens * capacity_factor / experts)
    return capacity + (-capacity) % 4


def route_expert_choice(logits, capacity_factor):
    """vmoe's expert choice in index form: softmax, each expert's top C tokens (slots by
    descending score), the scores as combine weights."""
    tokens, experts = logits.shape
    gates = F.softmax(logits, dim=1)
    weight, token = torch.topk(gates.t(), vmoe_capacity(tokens, experts, capacity_factor), dim=1)
    return weight, token


def sinkhorn_megatron(cost, tol=0.0001):
    """Megatron-Core's moe_utils.sinkhorn."""
    cost = torch.exp(cost)
    d0 = torch.ones(cost.size(0), dtype=cost.dtype)
    d1 = torch.ones(cost.size(1), dtype=cost.dtype)
    eps = 0.00000001
    error = 1e9
    d1_old = d1
    while error > tol:
        d0 = (1 / d0.size(0)) * 1 / (torch.sum(d1 * cost, 1) + eps)
        d1 = (1 / d1.size(0)) * 1 / (torch.sum(d0.unsqueeze(1) * cost, 0) + eps)
        error = torch.mean(torch.abs(d1_old - d1))
        d1_old = d1
    return d1 * cost * d0.unsqueeze(1)


def route_sbase(logits, k):
    """Megatron-Core's sinkhorn_load_balancing in training: top-k of the plan, the softmax (k > 1)
    of the chosen experts as weights."""
    with torch.no_grad():
        _, indices = torch.topk(sinkhorn_megatron(logits), k=k, dim=1)
    probs = torch.softmax(logits, dim=-1)
    routing_map = torch.zeros_like(logits).int().scatter(1, indices, 1).bool()
    return probs * routing_map, routing_map


def sinkhorn_ott(logits, rounds=20):
    """ott-jax's Sinkhorn in scaling mode as vmoe calls it: K = exp(logits), u = 1, rounds of
    v = (T/E) / K^T u, u = 1 / K v (K row-shifted: the plan is the same)."""
    tokens, experts = logits.shape
    K = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
    u = torch.ones(tokens)
    b = tokens / experts
    for _ in range(rounds):
        v = b / (K.t() @ u)
        u = 1 / (K @ v)
    return u.unsqueeze(1) * K * v


def route_sinkhorn_expert_choice(logits, capacity_factor):
    """vmoe's Sinkhorn expert choice: each expert's top C tokens of the plan, softmax weights."""
    tokens, experts = logits.shape
    plan = sinkhorn_ott(logits)
    _, token = torch.topk(plan.t(), vmoe_capacity(tokens, experts, capacity_factor), dim=1)
    return F.softmax(logits, dim=1).t().gather(1, token), token


def soft_moe_weights(x, phi):
    """Soft MoE dispatch and combine weights (normalised tokens and slots, one slot per expert)."""
    logits = F.normalize(x, dim=1) @ F.normalize(phi, dim=0)
    return F.softmax(logits, dim=0), F.softmax(logits, dim=1)


def soft_moe_layer(x, phi, scale, experts, slots, expert_fn=None):
    """Soft MoE as vmoe's SoftRouter + EinsumDispatcher compute it, for one group: tokens and slot
    vectors normalised by rsqrt(sum of squares + 1e-6), scale on the smaller operand, einsum logits,
    dispatch = softmax over the tokens, combine = softmax over all slots, slot inputs from the
    un-normalised x, identity experts unless expert_fn is given."""
    def normalize(t, dim):
        return t * torch.rsqrt(t.square().sum(dim=dim, keepdim=True) + 1e-6)
    xn = normalize(x, 1)
    mu = normalize(phi.view(x.shape[1], experts, slots), 0)
    if xn.numel() < mu.numel():
        xn = xn * scale
    else:
        mu = mu * scale
    logits = torch.einsum("md,dnp->mnp", xn, mu)
    dispatch = F.softmax(logits, dim=0)
    combine = F.softmax(logits.reshape(x.shape[0], -1), dim=1).view_as(logits)
    slot_in = torch.einsum("mnp,md->npd", dispatch, x)
    slot_out = expert_fn(slot_in) if expert_fn else slot_in
    return torch.einsum("mnp,npd->md", combine, slot_out)


def soft_moe_cases(reps):
    """Soft MoE forward at the benchmark's shape: (case, our benchmark, PyTorch seconds)."""
    torch.manual_seed(0)
    T, D, S, H = 16384, 1024, 512, 256
    E = 64
    p = S // E
    x = torch.randn(T, D)
    phi = torch.randn(D, S) / math.sqrt(D * E)
    scale = torch.ones(())
    w1 = torch.randn(E, D, H) / math.sqrt(D)
    w2 = torch.randn(E, H, D) / math.sqrt(H)

    def ffn(slot_in):  # [E, p, D] -> [E, p, D], GELU, one batched matmul per layer
        return torch.bmm(F.gelu(torch.bmm(slot_in, w1)), w2)

    logits = torch.randn(T, S) * 2

    def weights():  # given logits, as BM_SoftSlotsRoute: both softmaxes
        return F.softmax(logits, dim=0), F.softmax(logits, dim=1)

    with torch.no_grad():
        return [
            (f"Soft MoE dispatch + combine weights T:{T}/S:{S}", f"BM_SoftSlotsRoute/T:{T}/D:{D}/S:{S}",
             timed(weights, reps)),
            (f"Soft MoE layer, identity T:{T}/D:{D}/S:{S}", f"BM_SoftMoELayer/T:{T}/D:{D}/S:{S}",
             timed(lambda: soft_moe_layer(x, phi, scale, E, p), reps)),
            (f"Soft MoE layer, FFN T:{T}/D:{D}/S:{S}/H:{H}", f"BM_SoftMoELayerFFN/T:{T}/D:{D}/S:{S}/H:{H}",
             timed(lambda: soft_moe_layer(x, phi, scale, E, p, ffn), reps)),
        ]


def route_yuan_attention(x, w, k=2):
    """Yuan 2.0-M32's ParallelAttention_router and routing as its Hugging Face model writes them."""
    q, key, v = torch.chunk(x @ w.t(), 3, dim=-1)
    attn = torch.softmax(torch.matmul(q.unsqueeze(2), key.unsqueeze(1)), dim=-1)
    logits = torch.matmul(attn, v.unsqueeze(2)).squeeze(2)
    weights, experts = torch.topk(torch.softmax(logits, dim=1), k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), experts


def route_vq(x, codebook, experts, beta=0.25):
    """VQMoE's VectorQuantizer as its code routes: squared distances by the expanded form, the
    argmin code, code mod E, and the quantiser's loss."""
    distances = (x.pow(2).sum(dim=1, keepdim=True) + codebook.pow(2).sum(dim=1)
                 - 2 * torch.matmul(x, codebook.t()))
    codes = torch.argmin(distances, dim=1)
    quantized = codebook[codes]
    loss = torch.nn.functional.mse_loss(quantized, x) * (1 + beta)
    return codes % experts, loss


def route_depth_top_c(r, seq_len, capacity=0.125):
    """Mixture-of-Depths as its ports route a [B, L] batch: per sequence the top C = ceil(capacity L) router
    scores, the chosen positions back in sequence order, their scores the weights."""
    scores = r.view(-1, seq_len)
    C = math.ceil(capacity * seq_len)
    _, idx = torch.topk(scores, C, dim=1, sorted=False)
    idx, _ = torch.sort(idx, dim=1)
    return idx, torch.gather(scores, 1, idx)


def route_deepseek_v3(logits, bias, k, groups, groups_kept, route_scale=2.5):
    """DeepSeek-V3's gate as its inference code writes it: sigmoid scores, the bias added for
    selection only, a group scored by the sum of its top 2, the best groups kept, top-k among
    them, weights = the chosen unbiased scores renormalised, times route_scale."""
    scores = logits.sigmoid()
    original = scores
    scores = scores + bias
    tokens = scores.shape[0]
    grouped = scores.view(tokens, groups, -1)
    group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
    kept = group_scores.topk(groups_kept, dim=-1)[1]
    mask = torch.ones(tokens, groups, dtype=torch.bool).scatter_(1, kept, False)
    scores = grouped.masked_fill(mask.unsqueeze(-1), float("-inf")).flatten(1)
    indices = torch.topk(scores, k, dim=-1)[1]
    weights = original.gather(1, indices)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * route_scale, indices


def route_qwen3_moe(logits, k, norm_topk_prob=True):
    """Qwen3-MoE's gate as Hugging Face writes it (Qwen3MoeSparseMoeBlock), with the
    load-balancing loss its training adds (load_balancing_loss_func, one layer)."""
    experts = logits.shape[1]
    routing_weights = F.softmax(logits, dim=1, dtype=torch.float)
    routing_weights, selected = torch.topk(routing_weights, k, dim=-1)
    if norm_topk_prob:
        routing_weights = routing_weights / routing_weights.sum(dim=-1, keepdim=True)
    probs = F.softmax(logits, dim=-1)
    expert_mask = F.one_hot(selected, experts)
    tokens_per_expert = torch.mean(expert_mask.float(), dim=0)
    aux = torch.sum(tokens_per_expert * torch.mean(probs, dim=0).unsqueeze(0)) * experts
    return routing_weights, selected, aux


def route_deepseek_v2(logits, k, groups, groups_kept, scaling, seq_len, alpha=3e-3):
    """DeepSeek-V2's MoEGate (its hub code), group_limited_greedy, with its training-time
    sequence-wise balance loss over sequences of seq_len tokens."""
    tokens, experts = logits.shape
    scores = logits.softmax(dim=-1)
    group_scores = scores.view(tokens, groups, -1).max(dim=-1).values
    group_idx = torch.topk(group_scores, k=groups_kept, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(tokens, groups, experts // groups).reshape(tokens, -1)
    masked = scores.masked_fill(~score_mask.bool(), 0.0)
    weight, idx = torch.topk(masked, k=k, dim=-1, sorted=False)
    weight = weight * scaling
    bsz = tokens // seq_len
    seq_scores = scores.view(bsz, seq_len, -1)
    ce = torch.zeros(bsz, experts).scatter_add_(1, idx.view(bsz, -1), torch.ones(bsz, seq_len * k))
    ce = ce.div_(seq_len * k / experts)
    aux = (ce * seq_scores.mean(dim=1)).sum(dim=1).mean() * alpha
    return weight, idx, aux


def route_deepspeed_top1(logits, capacity_factor, min_capacity=8):
    """DeepSpeed top1gating with random token selection (use_rts, its default)."""
    tokens, experts = logits.shape
    gates = F.softmax(logits, dim=1)
    capacity = max(math.ceil(tokens / experts * capacity_factor), min_capacity)
    mask1 = F.one_hot(torch.argmax(gates, dim=1), num_classes=experts)
    l_aux = torch.sum(gates.mean(dim=0) * mask1.float().mean(dim=0)) * experts
    mask1_rand = mask1 * torch.rand(mask1.shape)
    top_idx = torch.topk(mask1_rand, k=capacity, dim=0)[1]
    mask1 = mask1 * torch.zeros_like(mask1).scatter_(0, top_idx, 1)
    locations1 = torch.cumsum(mask1, dim=0) - 1
    locations1_s = torch.sum(locations1 * mask1, dim=1)
    gates1_s = (gates * mask1).sum(dim=1)
    return gates1_s, locations1_s, mask1, l_aux


def route_deepspeed_top2(logits, capacity_factor, min_capacity=8):
    """DeepSpeed top2gating with its Gumbel-sampled second expert (its default)."""
    tokens, experts = logits.shape
    gates = F.softmax(logits, dim=1)
    mask1 = F.one_hot(torch.argmax(gates, dim=1), num_classes=experts)
    noisy = logits - torch.log(-torch.log(torch.rand(logits.shape)))  # + Gumbel(0, 1)
    mask2 = F.one_hot(torch.argmax(noisy.masked_fill(mask1.bool(), float("-inf")), dim=1), num_classes=experts)
    locations1 = torch.cumsum(mask1, dim=0) - 1
    locations2 = torch.cumsum(mask2, dim=0) - 1 + torch.sum(mask1, dim=0, keepdim=True)
    l_aux = torch.mean(gates.mean(dim=0) * mask1.float().mean(dim=0)) * experts * experts
    capacity = max(math.ceil(tokens / experts * 2 * capacity_factor), min_capacity)
    mask1 = mask1 * torch.lt(locations1, capacity)
    mask2 = mask2 * torch.lt(locations2, capacity)
    gates1_s = (gates * mask1).sum(dim=1)
    gates2_s = (gates * mask2).sum(dim=1)
    denom = torch.clamp(gates1_s + gates2_s, min=torch.finfo(torch.float32).eps)
    return gates1_s / denom, gates2_s / denom, (locations1 * mask1).sum(dim=1), (locations2 * mask2).sum(dim=1), l_aux


def route_top_p(logits, top_p=0.4):
    """Top-p routing as Dynamic_MoE's SwitchMLP routes (top_p_sampling_batched_all_sequence):
    softmax, sort descending, cumulative sum, keep the prefix up to and including the first
    expert whose cumulative probability exceeds p; weights = the raw probabilities."""
    probs = F.softmax(logits, dim=-1)
    sorted_probs, sorted_indices = torch.sort(probs, descending=True)
    cumulative = torch.cumsum(sorted_probs, dim=-1)
    mask = cumulative > top_p
    threshold = F.one_hot(mask.long().argmax(dim=-1), num_classes=sorted_indices.size(-1)).bool()
    mask = mask & ~threshold
    return torch.where(mask, 0.0, sorted_probs), torch.where(mask, -1, sorted_indices)


def router_cases(reps):
    """Routing of given logits by the stochastic and group-limited references: (case, our
    benchmark, PyTorch seconds)."""
    torch.manual_seed(0)
    cases = []
    for T, E, k in [(16384, 8, 1), (16384, 64, 1)]:
        logits = torch.randn(T, E) * 2
        cases.append((f"DeepSpeed top1gating + RTS T:{T}/E:{E}", f"BM_NoisyRoute/T:{T}/E:{E}/k:1",
                      timed(lambda: route_deepspeed_top1(logits, 1.25), reps)))
    for T, E in [(16384, 8), (16384, 64)]:
        logits = torch.randn(T, E) * 2
        cases.append((f"DeepSpeed top2gating + Gumbel T:{T}/E:{E}", f"BM_NoisyRoute/T:{T}/E:{E}/k:2",
                      timed(lambda: route_deepspeed_top2(logits, 1.25), reps)))
    T, E = 16384, 64
    logits = torch.randn(T, E) * 2
    cases.append((f"expert choice (vmoe) T:{T}/E:{E}/cf:2.5", f"BM_ExpertChoiceRoute/T:{T}/E:{E}/k:2",
                  timed(lambda: route_expert_choice(logits, 2.5), reps)))
    cases.append((f"S-BASE (Megatron sinkhorn) T:{T}/E:{E}/k:2", f"BM_SinkhornRoute/T:{T}/E:{E}/mode:2",
                  timed(lambda: route_sbase(logits, 2), reps)))
    cases.append((f"Sinkhorn expert choice T:{T}/E:{E}/cf:2.5", f"BM_SinkhornRoute/T:{T}/E:{E}/mode:1",
                  timed(lambda: route_sinkhorn_expert_choice(logits, 2.5), reps)))
    for T, E, D in [(16384, 64, 1024), (16384, 32, 1024)]:
        x = torch.randn(T, D)
        w = torch.randn(3 * E, D) / math.sqrt(D)
        cases.append((f"Yuan 2.0 attention router T:{T}/E:{E}/D:{D}", f"BM_AttentionRoute/T:{T}/E:{E}/D:{D}",
                      timed(lambda: route_yuan_attention(x, w), reps)))
    T, D, K = 16384, 1024, 256
    x = torch.randn(T, D)
    codebook = torch.randn(K, D) * 0.5
    cases.append((f"VQMoE nearest code T:{T}/D:{D}/K:{K}", f"BM_VQRoute/T:{T}/D:{D}/K:{K}",
                  timed(lambda: route_vq(x, codebook, 16), reps)))
    for T, L in [(16384, 2048), (16384, 512)]:
        r = torch.randn(T) * 2
        cases.append((f"Mixture-of-Depths top-C 12.5% T:{T}/L:{L}", f"BM_DepthRoute/T:{T}/L:{L}",
                      timed(lambda: route_depth_top_c(r, L), reps)))
    T, E, k, G = 16384, 256, 8, 8
    logits = torch.randn(T, E) * 2
    bias = torch.randn(E) * 1e-3
    cases.append((f"DeepSeek-V3 grouped top-k T:{T}/E:{E}/k:{k}", f"BM_GroupLimitedRoute/T:{T}/E:{E}/k:{k}/G:{G}",
                  timed(lambda: route_deepseek_v3(logits, bias, k, G, G // 2), reps)))
    T = 16384
    logits = torch.randn(T, 128) * 2
    cases.append((f"Qwen3-MoE gate + aux T:{T}/E:128/k:8", f"BM_ReleasedRoute/T:{T}/E:128/k:8/model:0",
                  timed(lambda: route_qwen3_moe(logits, 8), reps)))
    logits = torch.randn(T, 160) * 2
    cases.append((f"DeepSeek-V2 grouped gate + seq aux T:{T}/E:160/k:6", f"BM_ReleasedRoute/T:{T}/E:160/k:6/model:1",
                  timed(lambda: route_deepseek_v2(logits, 6, 8, 3, 16.0, 4096), reps)))
    for T, E in [(16384, 8), (16384, 64), (16384, 256)]:
        logits = torch.randn(T, E) * 2
        cases.append((f"Dynamic_MoE top-p 0.4 T:{T}/E:{E}", f"BM_TopPRoute/T:{T}/E:{E}",
                      timed(lambda: route_top_p(logits, 0.4), reps)))
    return cases


def pytorch_cases(T, D, E, k, cf, reps):
    torch.manual_seed(0)
    x = torch.randn(T, D)
    w = torch.randn(E, D) / math.sqrt(D)
    logits = torch.randn(T, E) * 2
    slots, kept, weights, capacity, _ = route_token_choice(logits, k, cf)
    token = torch.arange(T).unsqueeze(1).expand(T, k)[kept]
    slot = slots[kept]
    weight = weights[kept]
    buffer = torch.zeros(E * capacity, D)
    gathered = torch.empty(token.numel(), D)
    y = torch.empty(T, D)

    def dispatch_reused():
        torch.index_select(x, 0, token, out=gathered)
        buffer.index_copy_(0, slot, gathered)

    def dispatch_usual():
        out = torch.zeros(E * capacity, D)
        out[slot] = x[token]
        return out

    def combine_reused():
        y.zero_()
        torch.index_select(buffer, 0, slot, out=gathered)
        y.index_add_(0, token, gathered * weight.unsqueeze(1))

    def combine_usual():
        return torch.zeros(T, D).index_add_(0, token, buffer[slot] * weight.unsqueeze(1))

    def data_path():
        s, kp, wt, cap, _ = route_token_choice(x @ w.t(), k, cf)
        tok = torch.arange(T).unsqueeze(1).expand(T, k)[kp]
        sl, we = s[kp], wt[kp]
        buf = torch.zeros(E * cap, D)
        buf[sl] = x[tok]  # identity experts: the buffer is the expert output
        return torch.zeros(T, D).index_add_(0, tok, buf[sl] * we.unsqueeze(1))

    phi = torch.randn(D, E)
    x8 = torch.randn(T, 8)  # BM_NoisyTopKRoute's shape: the noise is part of the scorer
    w_gate, w_noise = torch.randn(8, E) * 0.7, torch.randn(8, E) * 0.1
    return {
        "route": timed(lambda: route_token_choice(logits, k, cf), reps),
        "dispatch": timed(dispatch_reused, reps),
        "dispatch (usual)": timed(dispatch_usual, reps),
        "combine": timed(combine_reused, reps),
        "combine (usual)": timed(combine_usual, reps),
        "data path": timed(data_path, max(1, reps // 2)),
        "soft moe weights": timed(lambda: soft_moe_weights(x, phi), reps),
        "noisy top-k route": timed(lambda: noisy_top_k_gating(x8, w_gate, w_noise, k), reps),
    }


def ours(bench, names, quick):
    """Median over repetitions of each benchmark's mean time, as the PyTorch side takes medians."""
    result = subprocess.run(
        [bench, "--benchmark_filter=^(" + "|".join(names) + ")$", "--benchmark_format=json",
         "--benchmark_min_time=" + ("0.2" if quick else "0.5"),
         "--benchmark_repetitions=" + ("3" if quick else "5"), "--benchmark_report_aggregates_only=true"],
        check=True, capture_output=True, text=True)
    data = json.loads(result.stdout)
    unit = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}
    return {b["run_name"]: b["real_time"] * unit[b["time_unit"]]
            for b in data["benchmarks"] if b.get("aggregate_name") == "median"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", default="build/bench/bench/moe_bench")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--filter", help="only the router rows whose case or benchmark name matches this "
                        "regular expression (e.g. 'top-p'); skips the data-path table")
    args = parser.parse_args()
    torch.set_num_threads(1)
    reps = 3 if args.quick else 7
    rows = []
    for T, D, E, k in [] if args.filter else [(16384, 1024, 64, 2), (16384, 1024, 8, 1)]:
        shape = f"T:{T}/D:{D}/E:{E}/k:{k}"
        ours_names = {
            "route": f"BM_TokenChoiceRoute/T:{T}/E:{E}/k:{k}",
            "dispatch": f"BM_Dispatch/{shape}",
            "combine": f"BM_Combine/{shape}",
            "data path": f"BM_LayerIdentity/{shape}",
            "noisy top-k route": f"BM_NoisyTopKRoute/T:{T}/E:{E}/k:{k}",
        }
        mine = ours(args.bench, list(ours_names.values()), args.quick)
        torch_times = pytorch_cases(T, D, E, k, 1.25, reps)
        for case, seconds in torch_times.items():
            name = ours_names.get(case.split(" (")[0]) if "usual" not in case else ours_names.get(case.split(" (")[0])
            our = mine.get(name) if name else None
            rows.append((f"{case} {shape}", our, seconds))
    cases = router_cases(reps) + soft_moe_cases(reps)
    if args.filter:
        cases = [c for c in cases if re.search(args.filter, c[0]) or re.search(args.filter, c[1])]
    mine = ours(args.bench, [name for _, name, _ in cases], args.quick)
    rows += [(case, mine.get(name), seconds) for case, name, seconds in cases]
    print(f"{'case':48} {'ours (ms)':>10} {'PyTorch (ms)':>13} {'ratio':>7}")
    for case, our, theirs in rows:
        o = f"{our * 1e3:10.2f}" if our else f"{'n/a':>10}"
        r = f"{theirs / our:6.1f}x" if our else f"{'':>7}"
        print(f"{case:48} {o} {theirs * 1e3:13.2f} {r}")
    print("\nratio = PyTorch time / our time (higher is better); n/a: router not yet in the library.")
    print("The Soft MoE layer rows are GEMM-bound: they measure PyTorch's BLAS (Debian's python3-torch is built "
          "with BLAS_INFO=generic) as much as the routing.")


if __name__ == "__main__":
    main()
