// GroupNorm followed (optionally) by SiLU on a bf16 channels-last CPU tensor, forward and backward,
// with float32 statistics, weights and arithmetic: each element is read as bf16, computed in float32
// and written once, rounded to bf16. vdm/model/fused.py builds it and wraps it in an autograd Function.
//
// Layout: x is (N, C, H, W) in channels-last memory, so sample n is P = H * W pixels of C contiguous
// channels. One sample's input (at most a few hundred KB for the UNet's maps) stays in the core's
// cache across the passes below, so each pass after the first costs little memory traffic; samples
// run in parallel (at::parallel_for), each with its own results, summed in a fixed order: the output
// is the same for any number of threads.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <bit>
#include <memory>
#include <vector>

namespace {

inline float bf16_to_float(uint16_t v) { return std::bit_cast<float>(static_cast<uint32_t>(v) << 16); }

// Round to nearest, ties to even, as c10::BFloat16 does (a NaN becomes the quiet NaN 0x7fc0).
inline uint16_t float_to_bf16(float f) {
  uint32_t u = std::bit_cast<uint32_t>(f);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return (f != f) ? static_cast<uint16_t>(0x7fc0) : static_cast<uint16_t>(rounded);
}

// exp(x) to about 2 ulp in float32 (range reduction by ln 2, a degree-6 polynomial on
// [-ln2/2, ln2/2]), written so that the compiler vectorises it; clamped to float32's range.
inline float exp_f32(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);  // (not fmin/fmax: those do not vectorise)
  float k = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - k * 0.693359375f + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * std::bit_cast<float>((static_cast<int32_t>(k) + 127) << 23);
}

inline float sigmoid_f32(float a) { return 1.0f / (1.0f + exp_f32(-a)); }

void check(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, int64_t groups) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kBFloat16 && x.device().is_cpu(),
              "group_norm_silu: a 4-D bf16 CPU tensor, got ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), "group_norm_silu: x must be channels-last");
  TORCH_CHECK(groups > 0 && x.size(1) % groups == 0, "group_norm_silu: channels not divisible by groups");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && bias.scalar_type() == at::kFloat &&
                  weight.numel() == x.size(1) && bias.numel() == x.size(1) && weight.is_contiguous() &&
                  bias.is_contiguous(),
              "group_norm_silu: float32 weight and bias of C elements");
}

using u16 = uint16_t;

// The loops over one sample's P pixels of C channels: each inner loop runs over the channels on
// unaliased pointers, so the compiler vectorises it.

// Per channel: sum[c] = sum_p x (centre == nullptr) or sum_p (x - centre[c])^2.
void channel_sums(const u16* __restrict x, int64_t P, int64_t C, const float* __restrict centre,
                  float* __restrict sum) {
  for (int64_t c = 0; c < C; ++c) sum[c] = 0.0f;
  for (int64_t p = 0; p < P; ++p) {
    const u16* __restrict xp = x + p * C;
    if (centre == nullptr) {
      for (int64_t c = 0; c < C; ++c) sum[c] += bf16_to_float(xp[c]);
    } else {
      for (int64_t c = 0; c < C; ++c) {
        const float v = bf16_to_float(xp[c]) - centre[c];
        sum[c] += v * v;
      }
    }
  }
}

// y = silu(x * scale + shift) (or without the SiLU), rounded to bf16.
template <bool SILU>
void normalise(const u16* __restrict x, u16* __restrict y, int64_t P, int64_t C, const float* __restrict scale,
               const float* __restrict shift) {
  for (int64_t p = 0; p < P; ++p) {
    const u16* __restrict xp = x + p * C;
    u16* __restrict yp = y + p * C;
    for (int64_t c = 0; c < C; ++c) {
      const float a = bf16_to_float(xp[c]) * scale[c] + shift[c];
      yp[c] = float_to_bf16(SILU ? a * sigmoid_f32(a) : a);
    }
  }
}

// da = dy * silu'(a) (or dy), a = xhat * w + b, xhat = (x - mean) * rstd; per channel the sums of
// da and of da * xhat.
template <bool SILU>
void grad_preactivation(const u16* __restrict x, const u16* __restrict dy, float* __restrict da, int64_t P,
                        int64_t C, const float* __restrict mean, const float* __restrict rstd,
                        const float* __restrict w, const float* __restrict b, float* __restrict sda,
                        float* __restrict sdax) {
  for (int64_t c = 0; c < C; ++c) sda[c] = sdax[c] = 0.0f;
  for (int64_t p = 0; p < P; ++p) {
    const u16* __restrict xp = x + p * C;
    const u16* __restrict dyp = dy + p * C;
    float* __restrict dap = da + p * C;
    for (int64_t c = 0; c < C; ++c) {
      const float xhat = (bf16_to_float(xp[c]) - mean[c]) * rstd[c];
      float g = bf16_to_float(dyp[c]);
      if (SILU) {
        const float a = xhat * w[c] + b[c];
        const float s = sigmoid_f32(a);
        g *= s * (1.0f + a * (1.0f - s));
      }
      dap[c] = g;
      sda[c] += g;
      sdax[c] += g * xhat;
    }
  }
}

// dx = k1 * da + k2 * x + k3, rounded to bf16.
void grad_input(const u16* __restrict x, const float* __restrict da, u16* __restrict dx, int64_t P, int64_t C,
                const float* __restrict k1, const float* __restrict k2, const float* __restrict k3) {
  for (int64_t p = 0; p < P; ++p) {
    const u16* __restrict xp = x + p * C;
    const float* __restrict dap = da + p * C;
    u16* __restrict dxp = dx + p * C;
    for (int64_t c = 0; c < C; ++c) dxp[c] = float_to_bf16(k1[c] * dap[c] + k2[c] * bf16_to_float(xp[c]) + k3[c]);
  }
}

// Sums channel values over each group of D channels, in double.
inline double group_sum(const float* v, int64_t g, int64_t D) {
  double t = 0.0;
  for (int64_t d = 0; d < D; ++d) t += v[g * D + d];
  return t;
}

// Returns (y, mean, rstd): y bf16 channels-last, mean and rstd float32 (N, G). The statistics take
// two passes (the mean, then the squared deviations from it).
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& x, const at::Tensor& weight,
                                                       const at::Tensor& bias, int64_t groups, double eps,
                                                       bool silu) {
  check(x, weight, bias, groups);
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3), G = groups, D = C / G;
  const double M = static_cast<double>(P * D);
  at::Tensor y = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  at::Tensor mean = at::empty({N, G}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({N, G}, x.options().dtype(at::kFloat));
  const u16* xd = reinterpret_cast<const u16*>(x.data_ptr<at::BFloat16>());
  u16* yd = reinterpret_cast<u16*>(y.data_ptr<at::BFloat16>());
  const float* w = weight.data_ptr<float>();
  const float* b = bias.data_ptr<float>();
  float* md = mean.data_ptr<float>();
  float* rd = rstd.data_ptr<float>();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> sum(C), centre(C), scale(C), shift(C);
    for (int64_t n = begin; n < end; ++n) {
      const u16* xn = xd + n * P * C;
      channel_sums(xn, P, C, nullptr, sum.data());
      for (int64_t g = 0; g < G; ++g) {
        md[n * G + g] = static_cast<float>(group_sum(sum.data(), g, D) / M);
        for (int64_t d = 0; d < D; ++d) centre[g * D + d] = md[n * G + g];
      }
      channel_sums(xn, P, C, centre.data(), sum.data());
      for (int64_t g = 0; g < G; ++g)
        rd[n * G + g] = static_cast<float>(1.0 / std::sqrt(group_sum(sum.data(), g, D) / M + eps));
      for (int64_t c = 0; c < C; ++c) {  // a = x * scale + shift
        scale[c] = rd[n * G + c / D] * w[c];
        shift[c] = b[c] - md[n * G + c / D] * scale[c];
      }
      if (silu)
        normalise<true>(xn, yd + n * P * C, P, C, scale.data(), shift.data());
      else
        normalise<false>(xn, yd + n * P * C, P, C, scale.data(), shift.data());
    }
  });
  return {y, mean, rstd};
}

// Returns (dx bf16 channels-last, dweight, dbias float32). With a = xhat * w + b, xhat = (x - mean) * rstd
// and y = silu(a): da = dy * s * (1 + a * (1 - s)), s = sigmoid(a); per group (M elements)
// dx = rstd * (da * w - mean(da * w) - xhat * mean(da * w * xhat)).
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& dy_in, const at::Tensor& x,
                                                        const at::Tensor& mean, const at::Tensor& rstd,
                                                        const at::Tensor& weight, const at::Tensor& bias,
                                                        int64_t groups, bool silu) {
  check(x, weight, bias, groups);
  at::Tensor dy = dy_in.to(at::kBFloat16).contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(dy.sizes() == x.sizes(), "group_norm_silu: dy and x differ in shape");
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3), G = groups, D = C / G;
  const double M = static_cast<double>(P * D);
  at::Tensor dx = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  at::Tensor dw_n = at::empty({N, C}, x.options().dtype(at::kFloat));  // per sample, summed at the end
  at::Tensor db_n = at::empty({N, C}, x.options().dtype(at::kFloat));
  const u16* xd = reinterpret_cast<const u16*>(x.data_ptr<at::BFloat16>());
  const u16* dyd = reinterpret_cast<const u16*>(dy.data_ptr<at::BFloat16>());
  u16* dxd = reinterpret_cast<u16*>(dx.data_ptr<at::BFloat16>());
  const float* w = weight.data_ptr<float>();
  const float* b = bias.data_ptr<float>();
  const float* md = mean.data_ptr<float>();
  const float* rd = rstd.data_ptr<float>();
  float* dwd = dw_n.data_ptr<float>();
  float* dbd = db_n.data_ptr<float>();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::unique_ptr<float[]> da(new float[P * C]);  // written whole by grad_preactivation: no zeroing
    std::vector<float> mean_c(C), rstd_c(C), wsda(C), wsdax(C), k1(C), k2(C), k3(C);
    for (int64_t n = begin; n < end; ++n) {
      const u16* xn = xd + n * P * C;
      for (int64_t c = 0; c < C; ++c) {
        mean_c[c] = md[n * G + c / D];
        rstd_c[c] = rd[n * G + c / D];
      }
      float* sda = dbd + n * C;  // the sums of da and da * xhat are this sample's dbias and dweight
      float* sdax = dwd + n * C;
      if (silu)
        grad_preactivation<true>(xn, dyd + n * P * C, da.get(), P, C, mean_c.data(), rstd_c.data(), w, b, sda,
                                 sdax);
      else
        grad_preactivation<false>(xn, dyd + n * P * C, da.get(), P, C, mean_c.data(), rstd_c.data(), w, b, sda,
                                  sdax);
      for (int64_t c = 0; c < C; ++c) {
        wsda[c] = w[c] * sda[c];
        wsdax[c] = w[c] * sdax[c];
      }
      for (int64_t g = 0; g < G; ++g) {
        const float m1 = static_cast<float>(group_sum(wsda.data(), g, D) / M);
        const float m2 = static_cast<float>(group_sum(wsdax.data(), g, D) / M);
        for (int64_t c = g * D; c < (g + 1) * D; ++c) {
          // rstd * (w * da - m1 - xhat * m2), xhat = (x - mean) * rstd
          k1[c] = rstd_c[c] * w[c];
          k2[c] = -rstd_c[c] * rstd_c[c] * m2;
          k3[c] = -rstd_c[c] * m1 - mean_c[c] * k2[c];
        }
      }
      grad_input(xn, da.get(), dxd + n * P * C, P, C, k1.data(), k2.data(), k3.data());
    }
  });
  at::Tensor dweight = at::zeros({C}, x.options().dtype(at::kFloat));
  at::Tensor dbias = at::zeros({C}, x.options().dtype(at::kFloat));
  float* dw = dweight.data_ptr<float>();
  float* db = dbias.data_ptr<float>();
  for (int64_t n = 0; n < N; ++n)  // in sample order, whatever the threads
    for (int64_t c = 0; c < C; ++c) {
      dw[c] += dwd[n * C + c];
      db[c] += dbd[n * C + c];
    }
  return {dx, dweight, dbias};
}

}  // namespace

TORCH_LIBRARY(vdm_fused, m) {
  m.def("group_norm_silu_forward(Tensor x, Tensor weight, Tensor bias, int groups, float eps, bool silu)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("group_norm_silu_backward(Tensor dy, Tensor x, Tensor mean, Tensor rstd, Tensor weight, Tensor bias,"
        " int groups, bool silu) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vdm_fused, CPU, m) {
  m.impl("group_norm_silu_forward", &forward);
  m.impl("group_norm_silu_backward", &backward);
}
