#pragma once
// The task-level router's scorer (Ye, Zha, Ren, "Eliciting and Understanding Cross-Task Skills
// with Task-Level Mixture-of-Experts", Findings of EMNLP 2022; docs/scorers.md, TaskScorer): the
// logits come from the segment's task, not from the tokens,
//   l_s = W2 gelu(W1 z_task(s) + b1) + b2,
// z a trainable table of task embeddings and gelu the exact (erf) one. Every token of segment s
// gets l_s + g_s, g_s one standard Gumbel draw per (segment, expert): the noise of
// gumbel_softmax, added here because a gate sees no TokenInputs (StraightThroughGate does the
// temperature and the straight-through). x is read by nobody: dx gets nothing from the router.
#include <cmath>
#include <cstdint>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "moe/core/math.hpp"
#include "moe/core/rng.hpp"
#include "moe/core/tensor.hpp"
#include "moe/core/validate.hpp"
#include "moe/core/workspace.hpp"
#include "moe/errors.hpp"

namespace moe {

template <scalar S>
class TaskScorer {
public:
  using scalar_type = S;

  struct Options {
    Index hidden = 64;  // the router unit's hidden width (LinearLayerSpecificRouterUnit)
    // the reference samples in evaluation too (its Selection always draws)
    Draws draws{.seed = 0, .at_evaluation = true};
    bool gumbel = true;  // false: no noise (the reference's "softmax" mode)
    std::uint64_t seed = 0;  // the parameters' initialisation
  };

  // One run of equal segment ids of the last forward: tokens [begin, end), its id and task row.
  struct Segment {
    Index begin, end;
    std::int32_t id, task;
  };

  TaskScorer(Index input_dim, Index num_experts, Index num_tasks, Index task_dim)
      : TaskScorer(input_dim, num_experts, num_tasks, task_dim, Options{}) {}
  TaskScorer(Index input_dim, Index num_experts, Index num_tasks, Index task_dim, Options opt)
      : input_dim_(input_dim), opt_(opt) {
    constexpr std::string_view where = "TaskScorer";
    detail::require<config_error>(input_dim >= 1, where, "input_dim", input_dim, "input_dim >= 1");
    detail::require<config_error>(num_experts >= 1, where, "num_experts", num_experts,
                                  "num_experts >= 1 (an empty expert set cannot be routed to)");
    detail::require<config_error>(num_tasks >= 1, where, "num_tasks", num_tasks, "num_tasks >= 1");
    detail::require<config_error>(num_tasks <= Index(INT32_MAX), where, "num_tasks", num_tasks,
                                  "num_tasks <= 2^31 - 1 (segment ids are int32)");
    detail::require<config_error>(task_dim >= 1, where, "task_dim", task_dim, "task_dim >= 1");
    detail::require<config_error>(opt.hidden >= 1, where, "hidden", opt.hidden, "hidden >= 1");
    const Index H = opt.hidden, E = num_experts;
    // nn.Embedding: N(0, 1); nn.Linear: weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    // Each matrix draws under its own step of the seed's generator.
    const auto normal = [&](Matrix<S>& m, Index rows, Index cols, std::uint64_t which) {
      const CounterRng rng(opt.seed, which);
      m.resize(rows, cols);
      for (Index i = 0; i < rows; ++i)
        for (Index j = 0; j < cols; ++j) m(i, j) = S(rng.normal(i, j));
    };
    const auto uniform = [&](Matrix<S>& m, Index rows, Index cols, Index fan_in, std::uint64_t which) {
      const CounterRng rng(opt.seed, which);
      const double bound = 1.0 / std::sqrt(double(fan_in));
      m.resize(rows, cols);
      for (Index i = 0; i < rows; ++i)
        for (Index j = 0; j < cols; ++j) m(i, j) = S(bound * (2 * rng.uniform(i, j) - 1));
    };
    normal(task_embedding_, num_tasks, task_dim, 0);
    uniform(w1_, H, task_dim, task_dim, 1);
    uniform(b1_, 1, H, task_dim, 2);
    uniform(w2_, E, H, H, 3);
    uniform(b2_, 1, E, H, 4);
    task_embedding_grad_.setZero(num_tasks, task_dim);
    w1_grad_.setZero(H, task_dim);
    b1_grad_.setZero(1, H);
    w2_grad_.setZero(E, H);
    b2_grad_.setZero(1, E);
  }

  Index input_dim() const { return input_dim_; }
  Index num_experts() const { return w2_.rows(); }
  Index num_tasks() const { return task_embedding_.rows(); }
  Index task_dim() const { return task_embedding_.cols(); }
  Index hidden() const { return w1_.rows(); }
  const Options& options() const { return opt_; }
  // A token's logits read its segment's task alone.
  constexpr bool causal() const { return true; }
  void set_draw_state(const DrawState& state) { state_ = state; }

  // z [tasks, Dt] (trainable): row k is task k's embedding.
  Matrix<S>& task_embedding() { return task_embedding_; }
  // Loads precomputed task vectors (the reference starts from text or Fisher embeddings).
  void set_task_embeddings(MatrixIn<S> z) {
    constexpr std::string_view where = "TaskScorer::set_task_embeddings";
    detail::check_shape(where, "z", z, num_tasks(), task_dim());
    detail::check_finite<S>(where, "z", z);
    task_embedding_ = z;
  }

  // Which task row each segment id uses: segment s reads row tasks[s]. Empty: the identity
  // (segment id = task row), the default.
  void set_segment_tasks(std::span<const std::int32_t> tasks) {
    for (std::size_t s = 0; s < tasks.size(); ++s)
      if (tasks[s] < 0 || tasks[s] >= num_tasks()) {
        std::ostringstream value;
        value << tasks[s] << " at entry " << s;
        detail::fail<value_error>("TaskScorer::set_segment_tasks", "tasks", value.str(),
                                  "a task row: 0 <= task < " + std::to_string(num_tasks()));
      }
    segment_task_.assign(tasks.begin(), tasks.end());
  }
  std::span<const std::int32_t> segment_tasks() const { return segment_task_; }

  // The last forward's segments, and per segment (rows in that order) the logits before the noise
  // and the Gumbel draws added to them (0 when none were drawn).
  std::span<const Segment> segments() const { return segments_; }
  MatrixIn<S> clean_logits() const { return clean_.topRows(Index(segments_.size())); }
  MatrixIn<S> draws() const { return draws_.topRows(Index(segments_.size())); }

  void forward(MatrixIn<S>, const TokenInputs<S>& tokens, MatrixOut<S> logits) {
    const Index T = logits.rows(), E = num_experts(), H = hidden();
    check_segments(tokens, T);  // before anything is written
    segments_.clear();
    for_each_segment(tokens.segment, T, [&](Index begin, Index end) {
      const std::int32_t id = tokens.segment.empty() ? 0 : tokens.segment[std::size_t(begin)];
      segments_.push_back({begin, end, id, task_of(id)});
    });
    const Index n = Index(segments_.size());
    auto pre = fit_rows(pre_, n, H), hidden = fit_rows(hidden_, n, H);
    auto clean = fit_rows(clean_, n, E), noise = fit_rows(draws_, n, E);
    const DrawSource<S> draw(opt_.draws, state_, DrawStream::gumbel, Distribution::gumbel, tokens.gumbel, E, tokens.first);
    const bool noisy = opt_.gumbel && draw.on();
    for (Index s = 0; s < n; ++s) {
      const Segment& seg = segments_[std::size_t(s)];
      pre.row(s).noalias() = task_embedding_.row(seg.task) * w1_.transpose();
      pre.row(s) += b1_.row(0);
      for (Index i = 0; i < H; ++i) hidden(s, i) = detail::gelu(pre(s, i));
      clean.row(s).noalias() = hidden.row(s) * w2_.transpose();
      clean.row(s) += b2_.row(0);
      // one draw per (segment, expert): the caller's at the segment's first token, or keyed by
      // the segment id, so a segment draws alike wherever it sits in the batch
      for (Index e = 0; e < E; ++e)
        noise(s, e) = !noisy ? S(0)
                      : draw.generated() ? draw.generator().template draw<S>(Distribution::gumbel, std::uint64_t(seg.id), std::uint64_t(e))
                                         : draw(seg.begin, e);
      for (Index t = seg.begin; t < seg.end; ++t) logits.row(t) = clean.row(s) + noise.row(s);
    }
  }

  // Each segment's dlogits summed over its tokens (padding included: its rows get what the router
  // gives them), then back through the MLP to its parameters and the segment's task row.
  void backward(MatrixIn<S>, const TokenInputs<S>&, MatrixIn<S> dlogits, MatrixOut<S> dx) {
    dx.setZero();
    const Index E = num_experts(), H = hidden();
    fit(dl_, 1, E);
    fit(da_, 1, H);
    for (std::size_t s = 0; s < segments_.size(); ++s) {
      const Segment& seg = segments_[s];
      const Index row = Index(s);
      dl_.setZero();
      for (Index t = seg.begin; t < seg.end; ++t) dl_ += dlogits.row(t);
      b2_grad_ += dl_;
      w2_grad_.noalias() += dl_.transpose() * hidden_.row(row);
      da_.noalias() = dl_ * w2_;
      for (Index i = 0; i < H; ++i) da_(0, i) *= detail::gelu_grad(pre_(row, i));
      b1_grad_ += da_;
      w1_grad_.noalias() += da_.transpose() * task_embedding_.row(seg.task);
      task_embedding_grad_.row(seg.task).noalias() += da_ * w1_;
    }
  }

  template <class F>
  void for_each_parameter(F&& visit) {
    visit(std::string_view("router.task_embedding"), MatrixOut<S>(task_embedding_), MatrixOut<S>(task_embedding_grad_));
    visit(std::string_view("router.w1"), MatrixOut<S>(w1_), MatrixOut<S>(w1_grad_));
    visit(std::string_view("router.b1"), MatrixOut<S>(b1_), MatrixOut<S>(b1_grad_));
    visit(std::string_view("router.w2"), MatrixOut<S>(w2_), MatrixOut<S>(w2_grad_));
    visit(std::string_view("router.b2"), MatrixOut<S>(b2_), MatrixOut<S>(b2_grad_));
  }

private:
  std::int32_t task_of(std::int32_t id) const { return segment_task_.empty() ? id : segment_task_[std::size_t(id)]; }

  // Segment ids: each segment one contiguous run (>= 0, non-decreasing) and each id a task.
  void check_segments(const TokenInputs<S>& tokens, Index T) const {
    constexpr std::string_view where = "TaskScorer";
    detail::check_segments(where, tokens.segment);
    const Index ids = segment_task_.empty() ? num_tasks() : Index(segment_task_.size());
    for_each_segment(tokens.segment, T, [&](Index begin, Index) {
      const std::int32_t id = tokens.segment.empty() ? 0 : tokens.segment[std::size_t(begin)];
      if (id < ids) return;
      std::ostringstream value;
      value << id << " at token " << begin;
      detail::fail<value_error>(where, "tokens.segment", value.str(),
                                "a task: 0 <= id < " + std::to_string(ids) +
                                    (segment_task_.empty() ? " (the task embeddings' rows)" : " (set_segment_tasks' entries)"));
    });
  }

  Index input_dim_;
  Options opt_;
  DrawState state_{};
  Matrix<S> task_embedding_, w1_, b1_, w2_, b2_;
  Matrix<S> task_embedding_grad_, w1_grad_, b1_grad_, w2_grad_, b2_grad_;
  std::vector<std::int32_t> segment_task_;  // empty: the identity
  // the last forward, per segment: its run, W1 z + b1, gelu of it, the clean logits, the draws
  std::vector<Segment> segments_;
  Matrix<S> pre_, hidden_, clean_, draws_;
  Matrix<S> dl_, da_;
};

}  // namespace moe
