#pragma once
// Plain optimizers over anything with for_each_parameter (a layer, a router, experts): enough
// for the examples and for users' own training loops.
#include <cmath>
#include <string_view>
#include <vector>

#include "moe/core/tensor.hpp"

namespace moe {

template <class Model>
void zero_grad(Model& model) {
  model.for_each_parameter([](std::string_view, auto, auto grad) { grad.setZero(); });
}

template <scalar S>
struct Sgd {
  S learning_rate = S(1e-2);

  template <class Model>
  void step(Model& model) const {
    model.for_each_parameter([&](std::string_view, auto value, auto grad) {
      value -= learning_rate * grad;
    });
  }
};

// Adam (Kingma & Ba 2015) with bias correction; moments follow the visit order.
template <scalar S>
class Adam {
public:
  explicit Adam(S learning_rate = S(1e-3), S beta1 = S(0.9), S beta2 = S(0.999), S eps = S(1e-8))
      : lr_(learning_rate), b1_(beta1), b2_(beta2), eps_(eps) {}

  template <class Model>
  void step(Model& model) {
    ++t_;
    const S c1 = S(1) - std::pow(b1_, S(t_)), c2 = S(1) - std::pow(b2_, S(t_));
    std::size_t i = 0;
    model.for_each_parameter([&](std::string_view, auto value, auto grad) {
      if (i == m_.size()) {
        m_.emplace_back(Matrix<S>::Zero(value.rows(), value.cols()));
        v_.emplace_back(Matrix<S>::Zero(value.rows(), value.cols()));
      }
      auto& m = m_[i];
      auto& v = v_[i++];
      m = b1_ * m + (S(1) - b1_) * grad;
      v.array() = b2_ * v.array() + (S(1) - b2_) * grad.array().square();
      value.array() -= lr_ * (m.array() / c1) / ((v.array() / c2).sqrt() + eps_);
    });
  }

private:
  S lr_, b1_, b2_, eps_;
  long t_ = 0;
  std::vector<Matrix<S>> m_, v_;
};

}  // namespace moe
