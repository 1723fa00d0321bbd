// The multi-layer routing study (README, "A multi-layer study"): a stack of four residual MoE
// layers, h_{l+1} = h_l + layer_l(h_l), trained on synthetic multi-task regression whose tasks
// share latent skills, routed three ways:
//   independent  a Switch router per layer, each with its own weight;
//   omni         the Omni-router: one scorer shared by every layer (make_omni_routers);
//   task         a task-level router per layer: one expert per task (segment id = task id).
// Tasks 2k and 2k+1 apply the same skill k (a random linear map) plus a small map of their own,
// to inputs around a centre of their own. Reported on held-out batches: the losses, the layer x
// layer routing agreement of each stack, and which experts each task's tokens take per layer
// (with how many same-skill and other task pairs end up on one expert). Printed and written as
// CSV files into --out (plot them with examples/plot_routing.py).
// Options: --steps N (default 3000), --seed N (routers, experts and draws), --out DIR (default .).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include <moe/moe.hpp>

namespace {

using S = float;
using moe::Index;
using Matrix = moe::Matrix<S>;

constexpr Index tasks = 6, skills = 3, dim = 16, hidden = 32, experts = 4, layers = 4;
constexpr Index task_dim = 8;  // the task router's embedding width
constexpr Index per_task = 64, batch = tasks * per_task;
constexpr Index train_batches = 32, heldout_batches = 8;  // a fixed training set, cycled
constexpr double capacity_factor = 2.0;  // room for one skill's two tasks on one expert
constexpr Index skill_of(Index task) { return task / 2; }

struct Config {
  long steps = 3000, seed = 1;
  std::string out = ".";
};

// The task structure is fixed (its own generator); --seed varies only the models.
struct Data {
  Matrix centre{tasks, dim}, skill_map{skills * dim, dim}, own_map{tasks * dim, dim};
  std::vector<std::int32_t> segment;  // task ids, sorted: tokens grouped by task

  Data() : segment(std::size_t(batch)) {
    const moe::CounterRng rng(7);
    const double scale = 1 / std::sqrt(double(dim));
    for (Index j = 0; j < dim; ++j) {
      for (Index t = 0; t < tasks; ++t) centre(t, j) = S(2 * rng.normal(100 + t, j));
      for (Index i = 0; i < skill_map.rows(); ++i) skill_map(i, j) = S(scale * rng.normal(200 + i, j));
      for (Index i = 0; i < own_map.rows(); ++i) own_map(i, j) = S(0.25 * scale * rng.normal(400 + i, j));
    }
    for (Index i = 0; i < batch; ++i) segment[std::size_t(i)] = std::int32_t(i / per_task);
  }

  // Batch `key`: x around its task's centre, target = x (M_skill + P_task).
  void make(Index key, Matrix& x, Matrix& target) const {
    const moe::CounterRng draw(9, std::uint64_t(key));
    x.resize(batch, dim);
    target.resize(batch, dim);
    for (Index i = 0; i < batch; ++i) {
      const Index t = i / per_task;
      for (Index j = 0; j < dim; ++j) x(i, j) = centre(t, j) + S(draw.normal(i, j));
      target.row(i) = x.row(i) * (skill_map.middleRows(skill_of(t) * dim, dim) + own_map.middleRows(t * dim, dim));
    }
  }
};

// Four residual MoE layers over one router type; the optimizer sees it as one model.
template <class Router>
struct Stack {
  std::vector<moe::MoELayer<Router, moe::FFNExperts<S>>> layer;
  std::vector<Matrix> h;  // h[0] = x, h[l + 1] = h[l] + layer_l(h[l])
  Matrix y{batch, dim}, g{batch, dim}, dx{batch, dim};

  Stack(std::vector<Router> routers, std::uint64_t seed) : h(std::size_t(layers + 1)) {
    layer.reserve(routers.size());
    for (auto& r : routers)
      layer.emplace_back(std::move(r), moe::FFNExperts<S>(experts, dim, hidden, moe::Activation::gelu,
                                                          seed + 100 + layer.size()));
  }
  const Matrix& forward(const Matrix& x, const moe::TokenInputs<S>& tokens) {
    h[0] = x;
    for (std::size_t l = 0; l < layer.size(); ++l) {
      layer[l].forward(h[l], y, tokens);
      h[l + 1] = h[l] + y;
    }
    return h.back();
  }
  void backward(const Matrix& dout) {  // the residual carries g past each layer
    g = dout;
    for (std::size_t l = layer.size(); l-- > 0;) {
      layer[l].backward(g, dx);
      g += dx;
    }
  }
  template <class F>
  void for_each_parameter(F&& visit) {
    for (auto& l : layer) l.for_each_parameter(visit);
  }
  void set_training(bool on) {
    for (auto& l : layer) {
      l.router().set_training(on);
      l.set_grad_enabled(on);
    }
  }
  double aux_loss() {
    double sum = 0;
    for (auto& l : layer) sum += double(l.router().aux_loss());
    return sum;
  }
};

struct Result {
  std::string name;
  double train_mse = 0, heldout_mse = 0;
  std::vector<moe::RoutingAgreement> agreement;  // [layers x layers], token-weighted over batches
  std::vector<moe::Matrix<double>> task_expert;  // per layer [tasks, experts + 1]: shares, last = dropped
};

// The first expert a token kept, or `experts` when every choice was dropped.
template <class R>
Index first_kept(const R& r, Index t) {
  for (Index c = r.token_offsets[t]; c < r.token_offsets[t + 1]; ++c)
    if (r.choice_slot[c] >= 0) return r.choice_expert[c];
  return experts;
}

// Mean MSE over batches [first, first + count) in evaluation mode; with `stats`, also the
// agreement and task -> expert shares.
template <class Router>
double evaluate(Stack<Router>& stack, const Data& data, Index first, Index count, Result* stats) {
  Matrix x, target;
  const moe::TokenInputs<S> tokens{.segment = data.segment};
  if (stats) {
    stats->agreement.assign(std::size_t(layers * layers), {});
    stats->task_expert.assign(std::size_t(layers), moe::Matrix<double>::Zero(tasks, experts + 1));
  }
  double sum = 0;
  for (Index b = first; b < first + count; ++b) {
    data.make(b, x, target);
    sum += (stack.forward(x, tokens) - target).squaredNorm() / double(batch * dim);
    if (!stats) continue;
    for (Index a = 0; a < layers; ++a) {
      const auto& ra = stack.layer[std::size_t(a)].routing();
      for (Index i = 0; i < batch; ++i) stats->task_expert[std::size_t(a)](i / per_task, first_kept(ra, i)) += 1;
      for (Index c = 0; c < layers; ++c) {
        const auto one = moe::routing_agreement(ra, stack.layer[std::size_t(c)].routing());
        auto& acc = stats->agreement[std::size_t(a * layers + c)];
        acc.top1 += one.top1 * double(one.tokens);
        acc.jaccard += one.jaccard * double(one.tokens);
        acc.tokens += one.tokens;
      }
    }
  }
  if (stats) {
    for (auto& acc : stats->agreement)
      if (acc.tokens > 0) acc.top1 /= double(acc.tokens), acc.jaccard /= double(acc.tokens);
    for (auto& m : stats->task_expert) m /= double(per_task * count);
  }
  return sum / double(count);
}

// Trains a stack with Adam on the cycled training set; `on_step(stack, step)` runs before each
// step (the task router's temperature schedule), `to_inference(stack)` after training. Then
// evaluates it.
template <class Router, class OnStep, class ToInference>
Result study(const char* name, Stack<Router>& stack, const Data& data, const Config& cfg, OnStep on_step,
             ToInference to_inference) {
  std::printf("\n== %s\nstep   train batch mse   aux loss\n", name);
  moe::Adam<S> adam(S(3e-3));
  Matrix x, target, dy;
  const moe::TokenInputs<S> tokens{.segment = data.segment};
  const long every = cfg.steps / 10 > 0 ? cfg.steps / 10 : 1;
  for (long step = 0; step < cfg.steps; ++step) {
    on_step(stack, step);
    data.make(step % train_batches, x, target);
    dy = stack.forward(x, tokens) - target;
    const double mse = dy.squaredNorm() / double(batch * dim);
    dy *= S(2) / S(batch * dim);
    moe::zero_grad(stack);
    stack.backward(dy);
    adam.step(stack);
    if (step % every == 0 || step + 1 == cfg.steps) std::printf("%5ld  %14.4f  %9.4f\n", step, mse, stack.aux_loss());
  }
  Result r;
  r.name = name;
  stack.set_training(false);  // no noise (the task router keeps its Gumbel draw, as its reference)
  to_inference(stack);
  r.train_mse = evaluate(stack, data, 0, train_batches, nullptr);
  r.heldout_mse = evaluate(stack, data, 1000, heldout_batches, &r);
  return r;
}

std::FILE* open_csv(const Config& cfg, const std::string& file) {
  std::error_code ignored;  // a failure shows as fopen's
  std::filesystem::create_directories(cfg.out, ignored);
  const std::string path = cfg.out + "/" + file;
  std::FILE* f = std::fopen(path.c_str(), "w");
  if (!f) {
    std::fprintf(stderr, "cannot write %s\n", path.c_str());
    std::exit(1);
  }
  return f;
}

void report_agreement(const Result& r, const Config& cfg) {
  std::printf("\n%s: layer x layer agreement (top-1 expert the same; held-out tokens)\n      ", r.name.c_str());
  for (Index c = 0; c < layers; ++c) std::printf("    L%ld", long(c));
  std::FILE* f = open_csv(cfg, "multilayer_agreement_" + r.name + ".csv");
  std::fprintf(f, "layer_a,layer_b,top1,jaccard,tokens\n");
  for (Index a = 0; a < layers; ++a) {
    std::printf("\n  L%ld  ", long(a));
    for (Index c = 0; c < layers; ++c) {
      const auto& acc = r.agreement[std::size_t(a * layers + c)];
      std::printf("  %.2f", acc.top1);
      std::fprintf(f, "%ld,%ld,%.4f,%.4f,%ld\n", long(a), long(c), acc.top1, acc.jaccard, long(acc.tokens));
    }
  }
  std::printf("\n");
  std::fclose(f);
}

// Per layer, each task's main expert (share of its tokens), and how many task pairs share
// their main expert: same-skill pairs (3 in all) against the others (12).
void report_task_experts(const Result& r, std::FILE* f) {
  std::printf("\n%s: main expert of each task per layer (share of its held-out tokens)\ntask skill", r.name.c_str());
  for (Index l = 0; l < layers; ++l) std::printf("       L%ld", long(l));
  std::vector<Index> main(std::size_t(layers * tasks));
  for (Index l = 0; l < layers; ++l)
    for (Index t = 0; t < tasks; ++t) {
      Index e;
      r.task_expert[std::size_t(l)].row(t).head(experts).maxCoeff(&e);
      main[std::size_t(l * tasks + t)] = e;
    }
  for (Index t = 0; t < tasks; ++t) {
    std::printf("\n%4ld %5ld", long(t), long(skill_of(t)));
    for (Index l = 0; l < layers; ++l) {
      const Index e = main[std::size_t(l * tasks + t)];
      std::printf("  e%ld %4.0f%%", long(e), 100 * r.task_expert[std::size_t(l)](t, e));
      std::fprintf(f, "%s,%ld,%ld,%ld", r.name.c_str(), long(l), long(t), long(skill_of(t)));
      for (Index e2 = 0; e2 <= experts; ++e2) std::fprintf(f, ",%.4f", r.task_expert[std::size_t(l)](t, e2));
      std::fprintf(f, ",%ld\n", long(e));
    }
  }
  std::printf("\npairs on one expert  ");
  int all_same = 0, all_other = 0;
  for (Index l = 0; l < layers; ++l) {
    int same = 0, other = 0;
    for (Index a = 0; a < tasks; ++a)
      for (Index b = a + 1; b < tasks; ++b)
        if (main[std::size_t(l * tasks + a)] == main[std::size_t(l * tasks + b)])
          ++(skill_of(a) == skill_of(b) ? same : other);
    std::printf(" %d/3 %2d/12", same, other);
    all_same += same, all_other += other;
  }
  // 1 in E by chance for either kind of pair
  std::printf("   (same skill, other)\nall layers: same-skill pairs together %d/12 (%.0f%%), other pairs %d/48 (%.0f%%)\n",
              all_same, 100.0 * all_same / 12, all_other, 100.0 * all_other / 48);
}

Config parse(int argc, char** argv) {
  Config cfg;
  for (int i = 1; i < argc; i += 2) {
    if (i + 1 >= argc) { std::fprintf(stderr, "option %s has no value\n", argv[i]); std::exit(2); }
    if (!std::strcmp(argv[i], "--out")) { cfg.out = argv[i + 1]; continue; }
    long* target = !std::strcmp(argv[i], "--steps") ? &cfg.steps : !std::strcmp(argv[i], "--seed") ? &cfg.seed : nullptr;
    char* end = nullptr;
    const long v = std::strtol(argv[i + 1], &end, 10);
    if (!target) { std::fprintf(stderr, "unknown option %s (--steps N, --seed N, --out DIR)\n", argv[i]); std::exit(2); }
    if (*end || v < (target == &cfg.steps ? 1 : 0)) { std::fprintf(stderr, "bad value for %s: '%s'\n", argv[i], argv[i + 1]); std::exit(2); }
    *target = v;
  }
  return cfg;
}

}  // namespace

int main(int argc, char** argv) {
  const Config cfg = parse(argc, argv);
  const Data data;
  const auto seed = std::uint64_t(cfg.seed);
  std::printf("%ld tasks (task t uses skill t/2 of %ld), D=%ld, %ld layers of %ld FFN experts (H=%ld), "
              "%ld tokens a batch, %ld steps, seed %ld\n",
              long(tasks), long(skills), long(dim), long(layers), long(experts), long(hidden), long(batch),
              cfg.steps, cfg.seed);
  std::fclose(open_csv(cfg, "multilayer_loss.csv"));  // an unwritable --out fails now, not after training
  const auto no_schedule = [](auto&, long) {};
  const auto as_trained = [](auto&) {};
  std::vector<Result> results;

  std::vector<moe::SwitchRouter<S>> own;
  for (Index l = 0; l < layers; ++l)
    own.push_back(moe::make_switch_router<S>(dim, experts, capacity_factor, seed + 10 * std::uint64_t(l)));
  Stack<moe::SwitchRouter<S>> independent(std::move(own), seed);
  results.push_back(study("independent", independent, data, cfg, no_schedule, as_trained));

  Stack<moe::OmniRouter<S>> omni(moe::make_omni_routers<S>(dim, experts, layers, capacity_factor, seed), seed);
  results.push_back(study("omni", omni, data, cfg, no_schedule, as_trained));

  // Task-level routing: trained in the reference's dense form (every expert runs, the chosen one
  // weighted 1 and the others 0, which still carry the router's gradient) with its temperature
  // schedule; evaluated in its sparse form (only the chosen expert runs: the same output).
  std::vector<moe::TaskRouter<S>> by_task;
  for (Index l = 0; l < layers; ++l)
    by_task.push_back(moe::make_task_router<S>(dim, experts, tasks, task_dim, 64, moe::TaskForm::dense,
                                               seed + 10 * std::uint64_t(l)));
  Stack<moe::TaskRouter<S>> task(std::move(by_task), seed);
  const auto anneal = [](auto& stack, long step) {
    const double tau = moe::gumbel_temperature(std::uint64_t(step), 2.0, 3e-4, 0.1);
    for (auto& l : stack.layer) l.router().gate().set_temperature(tau);
  };
  const auto sparse = [](auto& stack) {
    for (auto& l : stack.layer) l.router().selector().set_k(1);
  };
  results.push_back(study("task", task, data, cfg, anneal, sparse));

  std::printf("\nrouter        train mse  held-out mse\n");
  std::FILE* loss = open_csv(cfg, "multilayer_loss.csv");
  std::fprintf(loss, "router,train_mse,heldout_mse\n");
  for (const auto& r : results) {
    std::printf("%-12s %10.4f  %12.4f\n", r.name.c_str(), r.train_mse, r.heldout_mse);
    std::fprintf(loss, "%s,%.6f,%.6f\n", r.name.c_str(), r.train_mse, r.heldout_mse);
  }
  std::fclose(loss);
  for (const auto& r : results) report_agreement(r, cfg);
  std::FILE* shares = open_csv(cfg, "multilayer_task_experts.csv");
  std::fprintf(shares, "router,layer,task,skill");
  for (Index e = 0; e < experts; ++e) std::fprintf(shares, ",expert_%ld", long(e));
  std::fprintf(shares, ",dropped,main_expert\n");
  for (const auto& r : results) report_task_experts(r, shares);
  std::fclose(shares);
  return 0;
}
