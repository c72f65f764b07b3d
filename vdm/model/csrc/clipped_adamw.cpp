// One step of AdamW with update clipping (vdm/training/optim.py) over float32 CPU tensors, in two
// passes over memory instead of the foreach path's eleven: the first updates the moments and sums
// each tensor's (g / max(sqrt(v_hat), eps))^2, the second moves the weights at the rate that sum
// allows. Each tensor is cut into fixed chunks, whatever the thread count; the chunks' sums are added
// in order, so the step is the same bits on one thread or two.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kChunk = 1 << 14;

struct Chunk {
  int64_t tensor, begin, end;
};

// m <- m + (1 - beta1) (g - m); v <- beta2 v + (1 - beta2) g^2; returns sum (g / max(sqrt(v) / bc2, eps))^2,
// summed in kLanes running sums (so that the compiler vectorises the loop), then in order.
constexpr int64_t kLanes = 16;

inline float moment(const float gi, float& mi, float& vi, float w1, float beta2, float w2, float inv_bc2, float eps) {
  mi = mi + w1 * (gi - mi);
  vi = beta2 * vi + w2 * gi * gi;
  const float r = std::sqrt(vi) * inv_bc2;
  const float q = gi / (r > eps ? r : eps);
  return q * q;
}

double moments(const float* __restrict g, float* __restrict m, float* __restrict v, int64_t n, float w1,
               float beta2, float w2, float inv_bc2, float eps) {
  float lanes[kLanes] = {};
  const int64_t whole = n - n % kLanes;
  for (int64_t i = 0; i < whole; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) lanes[j] += moment(g[i + j], m[i + j], v[i + j], w1, beta2, w2, inv_bc2, eps);
  double sum = 0.0;
  for (int64_t j = 0; j < kLanes; ++j) sum += lanes[j];
  for (int64_t i = whole; i < n; ++i) sum += moment(g[i], m[i], v[i], w1, beta2, w2, inv_bc2, eps);
  return sum;
}

// p <- p * decay + step * m / (sqrt(v) / bc2 + eps)
void move(float* __restrict p, const float* __restrict m, const float* __restrict v, int64_t n, float decay,
          float step, float inv_bc2, float eps) {
  for (int64_t i = 0; i < n; ++i) p[i] = p[i] * decay + step * m[i] / (std::sqrt(v[i]) * inv_bc2 + eps);
}

// Returns each tensor's divisor of the rate: max(1, rms(g / max(sqrt(v_hat), eps)) / threshold); an
// empty list, having changed nothing, where a tensor is not float32 on the CPU in one shared dense layout.
std::vector<double> clipped_adamw(at::TensorList params, at::TensorList grads, at::TensorList exp_avg,
                                  at::TensorList exp_avg_sq, at::ArrayRef<double> steps, double lr, double beta1,
                                  double beta2, double eps, double weight_decay, double threshold) {
  const int64_t T = static_cast<int64_t>(params.size());
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == T && static_cast<int64_t>(exp_avg.size()) == T &&
                  static_cast<int64_t>(exp_avg_sq.size()) == T && static_cast<int64_t>(steps.size()) == T,
              "clipped_adamw: lists of different lengths");
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < T; ++t) {
    // Elementwise arithmetic over memory: any dense layout (a channels-last weight too) as long as
    // the four tensors share it. Otherwise nothing is touched and the caller takes the foreach ops.
    const at::Tensor& p = params[t];
    if (!p.device().is_cpu() || p.scalar_type() != at::kFloat || !p.is_non_overlapping_and_dense()) return {};
    for (const at::Tensor* x : {&grads[t], &exp_avg[t], &exp_avg_sq[t]})
      if (!x->device().is_cpu() || x->scalar_type() != at::kFloat || x->sizes() != p.sizes() ||
          x->strides() != p.strides())
        return {};
    for (int64_t b = 0; b < params[t].numel(); b += kChunk)
      chunks.push_back({t, b, std::min(b + kChunk, params[t].numel())});
  }
  const int64_t C = static_cast<int64_t>(chunks.size());
  std::vector<double> partial(C, 0.0), inv_bc2(T);
  for (int64_t t = 0; t < T; ++t) inv_bc2[t] = 1.0 / std::sqrt(1.0 - std::pow(beta2, steps[t]));
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const Chunk& k = chunks[c];
      const int64_t t = k.tensor;
      partial[c] = moments(grads[t].data_ptr<float>() + k.begin, exp_avg[t].data_ptr<float>() + k.begin,
                           exp_avg_sq[t].data_ptr<float>() + k.begin, k.end - k.begin, 1.0f - float(beta1),
                           float(beta2), 1.0f - float(beta2), float(inv_bc2[t]), float(eps));
    }
  });
  std::vector<double> sums(T, 0.0), divisors(T);
  for (int64_t c = 0; c < C; ++c) sums[chunks[c].tensor] += partial[c];  // in chunk order
  std::vector<float> decay(T), step(T);
  for (int64_t t = 0; t < T; ++t) {
    const double rms = std::sqrt(sums[t] / static_cast<double>(params[t].numel()));
    divisors[t] = std::max(1.0, rms / threshold);
    const double rate = lr / divisors[t];
    decay[t] = static_cast<float>(1.0 - rate * weight_decay);
    step[t] = static_cast<float>(-rate / (1.0 - std::pow(beta1, steps[t])));
  }
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const Chunk& k = chunks[c];
      const int64_t t = k.tensor;
      move(params[t].data_ptr<float>() + k.begin, exp_avg[t].data_ptr<float>() + k.begin,
           exp_avg_sq[t].data_ptr<float>() + k.begin, k.end - k.begin, decay[t], step[t], float(inv_bc2[t]),
           float(eps));
    }
  });
  return divisors;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vdm_fused, m) {
  m.def("clipped_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avg, Tensor(c!)[] exp_avg_sq,"
        " float[] steps, float lr, float beta1, float beta2, float eps, float weight_decay, float threshold)"
        " -> float[]");
}

TORCH_LIBRARY_IMPL(vdm_fused, CPU, m) { m.impl("clipped_adamw_", &clipped_adamw); }
