#pragma once
// Umbrella header: everything a user of moe-routers needs (docs/architecture.md shows the layout).
#include "moe/version.hpp"
#include "moe/config.hpp"
#include "moe/errors.hpp"
#include "moe/concepts.hpp"
#include "moe/routing.hpp"

#include "moe/core/gemm.hpp"
#include "moe/core/parallel.hpp"
#include "moe/core/rng.hpp"
#include "moe/core/tensor.hpp"
#include "moe/core/workspace.hpp"

#include "moe/kernels/codebook.hpp"
#include "moe/kernels/column_sums.hpp"
#include "moe/kernels/column_top_c.hpp"
#include "moe/kernels/dispatch.hpp"
#include "moe/kernels/finite.hpp"
#include "moe/kernels/sinkhorn.hpp"
#include "moe/kernels/slot_assignment.hpp"
#include "moe/kernels/small_logits.hpp"
#include "moe/kernels/softmax.hpp"
#include "moe/kernels/top_k.hpp"

#include "moe/scorers/linear.hpp"
#include "moe/gates/softmax.hpp"
#include "moe/gates/sigmoid.hpp"
#include "moe/gates/sqrt_softplus.hpp"
#include "moe/selectors/capacity.hpp"
#include "moe/selectors/top_k.hpp"
#include "moe/losses/load_balance.hpp"
#include "moe/losses/z_loss.hpp"

#include "moe/router.hpp"
#include "moe/presets.hpp"

#include "moe/layer/ffn_experts.hpp"
#include "moe/layer/identity_experts.hpp"
#include "moe/layer/swiglu_experts.hpp"
#include "moe/layer/moe_layer.hpp"
#include "moe/layer/optimizer.hpp"

#include "moe/io/safetensors.hpp"
