// CPU kernels of the training BatchNorm ops (csrc/bn_act.h drives them,
// csrc/epilogue.h holds their math, reference.py is the spec), compiled once
// per instruction set: bn_act.cpp includes this file (no include guard) inside
// namespace resnet_fused, RF_CPU_ISA naming each copy's namespace, with a
// `#pragma GCC target` for that instruction set in force, so every function
// and lambda below is compiled for it (epilogue.h and bn_act.h, included
// before, keep the default target and inline into these loops).
//
// Every pass views the dense activation as rows x cols with a contiguous inner
// loop: NCHW rows are (n, k) planes of HW values (one channel per row),
// channels_last rows are (n, h, w) pixels of K values (channel = column).
//
// Vectorization: the inner loops are plain loops over the epilogue.h scalar
// functions, written for g++'s auto-vectorizer (__restrict, flags as template
// parameters so the bodies are branch-free, sums split over kLanes
// independent accumulators since a single float sum may not be reassociated),
// which widens them to the instruction set of the copy. The loops over
// several streams also say `#pragma GCC ivdep`: g++ does not take __restrict
// on these local row pointers as proof, and past 10 runtime alias checks it
// leaves a loop scalar (the training backward apply with a residual gradient
// reads 5 tensors and rows of coefficients and ran 5x slower); no iteration
// there reads what another writes (outputs are fresh, or the same element of
// an input). Not
// at::vec::Vectorized: this extension is compiled without ATen's
// CPU_CAPABILITY flags, so Vectorized is its generic fallback, which g++
// turns into scalar code with a branch per lane for selects. Measured on 8M
// floats: relu(x * 2 + 1) 45 ms through Vectorized, 6 ms as a plain loop.
// Without -ffast-math or fp contraction (setup.py) the vectorizer only works
// across independent lanes or channels, so every copy computes the same bits.
//
// Reductions are deterministic: the chunking comes from the shape alone
// (Chunking), each chunk is reduced by one thread in a fixed order, and the
// per-chunk partials are merged pairwise in chunk order, so the thread count
// changes nothing (and the lane count is a constant, not the machine's).

namespace RF_CPU_ISA {
namespace {


// Elements per parallel task, as in conv_bn_act.cpp.
constexpr int64_t kGrain = 32 * 1024;
// Reduction chunks. Within a chunk each lane (NCHW) or channel
// (channels_last) sums at most 256 values in sequence; longer float running
// sums go wrong systematically, not randomly, on real data: values quantized
// to ulp(mean) (mean 1000, std 0.01) have squares whose low bits round the
// same way at every step (measured: var 1.3e-5 too small with 2048 values
// per lane). Partials are then merged in double, where that cannot happen.
// NCHW: 2048 values of a plane (8 KiB of fp32: the second pass reads L1).
constexpr int64_t kPlaneChunk = 2048;
// channels_last: 64 rows of K values; the double partials (16 bytes per
// chunk and channel) stay at most 1/16 of an fp32 input.
constexpr int64_t kRowChunk = 64;
// Independent partial sums per NCHW chunk (one 256-bit vector of floats).
constexpr int64_t kLanes = 8;

// f(std::true_type{}) or f(std::false_type{}): a runtime flag as a template
// parameter, so each loop body is compiled without the branch.
template <typename F>
void with_flag(bool flag, F&& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// Lane sums in lane order (fixed: deterministic).
template <typename acc_t>
acc_t sum_lanes(const acc_t (&lanes)[kLanes]) {
  acc_t s = lanes[0];
  for (int64_t l = 1; l < kLanes; ++l) s += lanes[l];
  return s;
}

// ---------------------------------------------------------------- bn_stats

// Moments of n contiguous values of one channel (an NCHW plane chunk): two
// passes, the second over values the first just brought into L1.
template <typename scalar_t>
Moments plane_chunk_moments(const scalar_t* __restrict p, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t full = n - n % kLanes;
  acc_t s[kLanes] = {};
  for (int64_t i = 0; i < full; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) s[l] += static_cast<acc_t>(p[i + l]);
  }
  acc_t sum = sum_lanes(s);
  for (int64_t i = full; i < n; ++i) sum += static_cast<acc_t>(p[i]);
  const acc_t m = sum / static_cast<acc_t>(n);

  acc_t d[kLanes] = {}, q[kLanes] = {};
  for (int64_t i = 0; i < full; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) centered_accumulate(static_cast<acc_t>(p[i + l]), m, d[l], q[l]);
  }
  acc_t dt = sum_lanes(d), qt = sum_lanes(q);
  for (int64_t i = full; i < n; ++i) centered_accumulate(static_cast<acc_t>(p[i]), m, dt, qt);
  return chunk_moments(m, dt, qt, n);
}

// Moments of every channel over `rows` channels_last rows; the loops over k
// are independent per channel, so they vectorize as they stand.
// y:       rows x K values, row-major (the chunk's first row)
// mean:    (K,) double out, the chunk's per-channel means
// m2:      (K,) double out, the chunk's per-channel M2
// scratch: (3K,) acc_t
template <typename scalar_t>
void rows_chunk_moments(const scalar_t* __restrict y, int64_t rows, int64_t K, double* __restrict mean,
                        double* __restrict m2, at::opmath_type<scalar_t>* __restrict scratch) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t* __restrict m = scratch;
  acc_t* __restrict d = scratch + K;
  acc_t* __restrict q = scratch + 2 * K;
  std::fill(scratch, scratch + 3 * K, acc_t(0));
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* __restrict row = y + r * K;
    for (int64_t k = 0; k < K; ++k) m[k] += static_cast<acc_t>(row[k]);
  }
  const acc_t inv_rows = acc_t(1) / static_cast<acc_t>(rows);
  for (int64_t k = 0; k < K; ++k) m[k] *= inv_rows;  // only a first guess: chunk_moments corrects it
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* __restrict row = y + r * K;
    for (int64_t k = 0; k < K; ++k) centered_accumulate(static_cast<acc_t>(row[k]), m[k], d[k], q[k]);
  }
  for (int64_t k = 0; k < K; ++k) {
    const Moments chunk = chunk_moments(m[k], d[k], q[k], rows);
    mean[k] = chunk.mean;
    m2[k] = chunk.m2;
  }
}

// Chunks [lo, hi) of channel k merged pairwise: rounding grows with log2 of the
// chunk count rather than linearly, and the tree depends only on the shape.
// part_mean, part_m2: (chunks, K), [chunk][channel]
Moments merge_chunks(const double* part_mean, const double* part_m2, const Chunking& ch, int64_t K, int64_t k,
                     int64_t lo, int64_t hi) {
  if (hi - lo == 1) return {part_mean[lo * K + k], part_m2[lo * K + k], ch.count(lo)};
  const int64_t mid = lo + (hi - lo) / 2;
  return chan_merge(merge_chunks(part_mean, part_m2, ch, K, k, lo, mid),
                    merge_chunks(part_mean, part_m2, ch, K, k, mid, hi));
}

// The same pairwise order for plain sums. part: (chunks, K).
double sum_chunks(const double* part, int64_t K, int64_t k, int64_t lo, int64_t hi) {
  if (hi - lo == 1) return part[lo * K + k];
  const int64_t mid = lo + (hi - lo) / 2;
  return sum_chunks(part, K, k, lo, mid) + sum_chunks(part, K, k, mid, hi);
}

Chunking cpu_chunking(const BnActView& v) {
  return make_chunking(v, kPlaneChunk, kRowChunk);
}

// Tasks of a per-chunk pass: NCHW chunks are plane pieces, so small planes
// make small tasks and a task takes several.
int64_t chunk_grain(const BnActView& v, const Chunking& ch) {
  const int64_t values = v.channels_last ? ch.len * v.K : std::min(ch.len, v.HW);
  return std::max<int64_t>(1, kGrain / values);
}

// NCHW: runs chunk(t) for t = plane * per_group + s, the s-th chunk of every
// plane (its partials go to chunk index (n, s)), in parallel tasks.
template <typename F>
void for_each_plane_chunk(const BnActView& v, const Chunking& ch, const F& chunk) {
  at::parallel_for(0, v.N * v.K * ch.per_group, chunk_grain(v, ch), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) chunk(t);
  });
}

void stats_cpu(const at::Tensor& y, const BnActView& v, at::Tensor& mean, at::Tensor& var) {
  const Chunking ch = cpu_chunking(v);
  const int64_t K = v.K;
  // Partials in double, see Moments in epilogue.h.
  const at::Tensor part = at::empty({2, ch.chunks, K}, mean.options().dtype(at::kDouble));
  double* part_mean = part.mutable_data_ptr<double>();  // (chunks, K)
  double* part_m2 = part_mean + ch.chunks * K;          // (chunks, K)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bn_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    if (v.channels_last) {
      at::parallel_for(0, ch.chunks, chunk_grain(v, ch), [&](int64_t begin, int64_t end) {
        std::vector<acc_t> scratch(3 * K);
        for (int64_t c = begin; c < end; ++c) {
          rows_chunk_moments(yp + c * ch.len * K, ch.count(c), K, part_mean + c * K, part_m2 + c * K,
                             scratch.data());
        }
      });
    } else {
      for_each_plane_chunk(v, ch, [&](int64_t t) {
        const int64_t plane = t / ch.per_group, s = t % ch.per_group;
        const int64_t at = ((plane / K) * ch.per_group + s) * K + plane % K;  // [chunk (n, s)][k]
        const Moments m = plane_chunk_moments(yp + plane * v.HW + s * ch.len, ch.count(s));
        part_mean[at] = m.mean;
        part_m2[at] = m.m2;
      });
    }
    acc_t* mean_out = mean.mutable_data_ptr<acc_t>();
    acc_t* var_out = var.mutable_data_ptr<acc_t>();
    at::parallel_for(0, K, std::max<int64_t>(1, kGrain / ch.chunks), [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        moments_finalize(merge_chunks(part_mean, part_m2, ch, K, k, 0, ch.chunks), mean_out[k], var_out[k]);
      }
    });
  });
}

// ---------------------------------------------------------------- bn_act_apply

// out = act(y * scale + shift [+ residual]) over rows x cols (see the top).
// y, residual, out: rows x cols, dense (residual unread unless kRes)
// scale, shift:     (K,)
template <typename scalar_t, bool kChannelsLast, bool kRes, ActKind kAct>
void apply_loop(const scalar_t* y, const scalar_t* residual, const at::opmath_type<scalar_t>* scale,
                const at::opmath_type<scalar_t>* shift, int64_t rows, int64_t cols, int64_t K,
                at::opmath_type<scalar_t> a, at::opmath_type<scalar_t> b, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / cols), [=](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* __restrict yr = y + row * cols;
      const scalar_t* __restrict rr = kRes ? residual + row * cols : nullptr;
      scalar_t* __restrict o = out + row * cols;
      const acc_t row_scale = kChannelsLast ? acc_t(0) : scale[row % K];
      const acc_t row_shift = kChannelsLast ? acc_t(0) : shift[row % K];
      #pragma GCC ivdep
      for (int64_t j = 0; j < cols; ++j) {
        const acc_t res = kRes ? static_cast<acc_t>(rr[j]) : acc_t(0);
        o[j] = static_cast<scalar_t>(bn_residual_act<kAct>(static_cast<acc_t>(yr[j]),
                                                           kChannelsLast ? scale[j] : row_scale,
                                                           kChannelsLast ? shift[j] : row_shift, res, kRes, a, b));
      }
    }
  });
}

void apply_cpu(const at::Tensor& y, const ChannelParams& bn, const at::Tensor& residual, const BnActView& v,
               const Activation<double>& activation, at::Tensor& out) {
  const int64_t K = v.K;
  const int64_t rows = v.channels_last ? v.N * v.HW : v.N * K;
  const int64_t cols = v.channels_last ? K : v.HW;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bn_act_apply_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> scale, shift;
    fold_channels(bn, K, scale, shift);
    const auto act = activation_as<acc_t>(activation);
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const scalar_t* rp = residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    with_flag(v.channels_last, [&](auto cl) {
      with_flag(rp != nullptr, [&](auto res) {
        with_activation(act.kind, [&](auto kind) {
          apply_loop<scalar_t, cl.value, res.value, kind.value>(yp, rp, scale.data(), shift.data(), rows, cols, K,
                                                                act.a, act.b, op);
        });
      });
    });
  });
}

// ---------------------------------------------------------------- bn_act_backward_reduce

// The ACT-specific part of a backward pass: g = dL/dz of one element
// (preactivation_grad), out read only for ReLU.
template <ActKind kAct, typename scalar_t, typename acc_t>
inline acc_t grad_z(const scalar_t* __restrict grad, const scalar_t* __restrict out, const scalar_t* __restrict y,
                    int64_t i, acc_t scale, acc_t shift, const Activation<acc_t>& act) {
  const acc_t go = static_cast<acc_t>(grad[i]);
  const acc_t o = kAct == ActKind::kRelu ? static_cast<acc_t>(out[i]) : go;
  return preactivation_grad<kAct>(go, o, static_cast<acc_t>(y[i]), scale, shift, act.a, act.b);
}

// Per-chunk sum(g) and sum(g * (y - mean)) of an NCHW plane chunk, one channel.
// grad, out, y: n <= kPlaneChunk contiguous values each (out unread unless ReLU)
// scale, shift: the channel's BN affine (read when kAct needs z)
template <typename scalar_t, ActKind kAct>
void plane_chunk_backward_sums(const scalar_t* __restrict grad, const scalar_t* __restrict out,
                               const scalar_t* __restrict y, int64_t n, at::opmath_type<scalar_t> mean,
                               at::opmath_type<scalar_t> scale, at::opmath_type<scalar_t> shift,
                               const Activation<at::opmath_type<scalar_t>>& act, double& sum_g_out,
                               double& sum_gc_out) {
  using acc_t = at::opmath_type<scalar_t>;
  // g first, into an L1 buffer: g++ if-converts the ReLU mask only in a simple
  // innermost loop, not in the unrolled lane loop below (measured 3x slower).
  acc_t g[kPlaneChunk];
  for (int64_t i = 0; i < n; ++i) g[i] = grad_z<kAct>(grad, out, y, i, scale, shift, act);
  // Sums in double, as ATen's CPU batch_norm backward accumulates (dγ of a
  // float chunk sum came out 2x less exact than the unfused module's).
  const int64_t full = n - n % kLanes;
  const double m = mean;
  double sg[kLanes] = {}, sgc[kLanes] = {};
  for (int64_t i = 0; i < full; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      bn_backward_accumulate<double>(g[i + l], static_cast<double>(y[i + l]), m, sg[l], sgc[l]);
    }
  }
  double sum_g = sum_lanes(sg), sum_gc = sum_lanes(sgc);
  for (int64_t i = full; i < n; ++i) bn_backward_accumulate<double>(g[i], static_cast<double>(y[i]), m, sum_g, sum_gc);
  sum_g_out = sum_g;
  sum_gc_out = sum_gc;
}

// The same over `rows` channels_last rows, every channel at once.
// grad, out, y:          rows x K values, row-major (out unread unless ReLU)
// mean, scale, shift:    (K,); scale/shift the BN affine (read when kAct needs z)
// sum_g_out, sum_gc_out: (K,) double out
// scratch:               (3K,) double: the sums (in double as in the NCHW
//                        chunks), then one row's g
template <typename scalar_t, ActKind kAct>
void rows_chunk_backward_sums(const scalar_t* __restrict grad, const scalar_t* __restrict out,
                              const scalar_t* __restrict y, int64_t rows, int64_t K,
                              const at::opmath_type<scalar_t>* __restrict mean,
                              const at::opmath_type<scalar_t>* __restrict scale,
                              const at::opmath_type<scalar_t>* __restrict shift,
                              const Activation<at::opmath_type<scalar_t>>& act, double* __restrict sum_g_out,
                              double* __restrict sum_gc_out, double* __restrict scratch) {
  using acc_t = at::opmath_type<scalar_t>;
  double* __restrict sg = scratch;
  double* __restrict sgc = scratch + K;
  // A row's g first, as in the NCHW chunks: with the ReLU select inside the
  // accumulating loop g++ kept a branch per element (measured 40 ms for 6.4M
  // values, 7 ms without the activation).
  acc_t* __restrict g = reinterpret_cast<acc_t*>(scratch + 2 * K);
  std::fill(scratch, scratch + 2 * K, 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t base = r * K;
    #pragma GCC ivdep
    for (int64_t k = 0; k < K; ++k) g[k] = grad_z<kAct>(grad, out, y, base + k, scale[k], shift[k], act);
    #pragma GCC ivdep
    for (int64_t k = 0; k < K; ++k) {
      bn_backward_accumulate<double>(g[k], static_cast<double>(y[base + k]), mean[k], sg[k], sgc[k]);
    }
  }
  std::copy(sg, sg + K, sum_g_out);
  std::copy(sgc, sgc + K, sum_gc_out);
}

void backward_reduce_cpu(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& y,
                         const ChannelParams& bn, const BnActView& v, const Activation<double>& activation,
                         at::Tensor& sum_g, at::Tensor& sum_g_xhat) {
  const Chunking ch = cpu_chunking(v);
  const int64_t K = v.K;
  // Partials in double, merged in double like the bn_stats Moments.
  const at::Tensor part = at::empty({2, ch.chunks, K}, sum_g.options().dtype(at::kDouble));
  double* part_g = part.mutable_data_ptr<double>();  // (chunks, K)
  double* part_gc = part_g + ch.chunks * K;          // (chunks, K)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bn_act_backward_reduce_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto act = activation_as<acc_t>(activation);
    const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* op = act.kind == ActKind::kRelu ? out.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    const acc_t* mp = bn.running_mean.const_data_ptr<acc_t>();
    std::vector<acc_t> scale, shift;  // the forward's BN affine, to recompute z
    fold_channels(bn, K, scale, shift);
    with_activation(act.kind, [&](auto kind) {
      constexpr ActKind kAct = decltype(kind)::value;
      if (v.channels_last) {
        at::parallel_for(0, ch.chunks, chunk_grain(v, ch), [&](int64_t begin, int64_t end) {
          std::vector<double> scratch(3 * K);
          for (int64_t c = begin; c < end; ++c) {
            const int64_t base = c * ch.len * K;
            rows_chunk_backward_sums<scalar_t, kAct>(gp + base, op ? op + base : nullptr, yp + base, ch.count(c), K,
                                                     mp, scale.data(), shift.data(), act, part_g + c * K,
                                                     part_gc + c * K, scratch.data());
          }
        });
      } else {
        for_each_plane_chunk(v, ch, [&](int64_t t) {
          const int64_t plane = t / ch.per_group, s = t % ch.per_group, k = plane % K;
          const int64_t at = ((plane / K) * ch.per_group + s) * K + k;
          const int64_t base = plane * v.HW + s * ch.len;
          plane_chunk_backward_sums<scalar_t, kAct>(gp + base, op ? op + base : nullptr, yp + base, ch.count(s),
                                                    mp[k], scale[k], shift[k], act, part_g[at], part_gc[at]);
        });
      }
    });
    const acc_t* vp = bn.running_var.const_data_ptr<acc_t>();
    const double eps = bn.eps;
    acc_t* sg_out = sum_g.mutable_data_ptr<acc_t>();
    acc_t* sgx_out = sum_g_xhat.mutable_data_ptr<acc_t>();
    at::parallel_for(0, K, std::max<int64_t>(1, kGrain / ch.chunks), [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        sg_out[k] = static_cast<acc_t>(sum_chunks(part_g, K, k, 0, ch.chunks));
        // invstd in double too: one rounding between the double sum and dγ.
        sgx_out[k] = static_cast<acc_t>(bn_sum_g_xhat<double>(sum_chunks(part_gc, K, k, 0, ch.chunks), vp[k], eps));
      }
    });
  });
}

// ---------------------------------------------------------------- bn_act_backward_apply

// dy (and d_residual = g) over rows x cols.
// grad, out, y:   rows x cols, dense (out unread unless ReLU)
// coef:           (7, K) rows mean, invstd, scale, mean_g, mean_g_xhat, and the
//                 forward's BN affine z_scale, z_shift (read when kAct needs z)
// dy, d_residual: rows x cols out (d_residual unwritten unless kRes)
template <typename scalar_t, bool kChannelsLast, ActKind kAct, bool kTraining, bool kRes>
void backward_apply_loop(const scalar_t* grad, const scalar_t* out, const scalar_t* y,
                         const at::opmath_type<scalar_t>* coef, const Activation<at::opmath_type<scalar_t>>& act,
                         int64_t rows, int64_t cols, int64_t K, scalar_t* dy, scalar_t* d_residual) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t *c_mean = coef, *c_invstd = coef + K, *c_scale = coef + 2 * K, *c_mg = coef + 3 * K,
              *c_mgx = coef + 4 * K, *c_zscale = coef + 5 * K, *c_zshift = coef + 6 * K;
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / cols), [=](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t base = row * cols, rk = kChannelsLast ? 0 : row % K;
      const scalar_t* __restrict gr = grad + base;
      const scalar_t* __restrict orow = kAct == ActKind::kRelu ? out + base : nullptr;
      const scalar_t* __restrict yr = y + base;
      scalar_t* __restrict dyr = dy + base;
      scalar_t* __restrict drr = kRes ? d_residual + base : nullptr;
      #pragma GCC ivdep
      for (int64_t j = 0; j < cols; ++j) {
        const int64_t k = kChannelsLast ? j : rk;
        const acc_t g = grad_z<kAct>(gr, orow, yr, j, c_zscale[k], c_zshift[k], act);
        dyr[j] = static_cast<scalar_t>(bn_backward_dy(g, static_cast<acc_t>(yr[j]), c_mean[k], c_invstd[k],
                                                      c_scale[k], c_mg[k], c_mgx[k], kTraining));
        if (kRes) drr[j] = static_cast<scalar_t>(g);
      }
    }
  });
}

void backward_apply_cpu(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& y,
                        const BnBackwardInputs& p, const BnActView& v, const Activation<double>& activation,
                        at::Tensor& dy, at::Tensor& d_residual) {
  const int64_t K = v.K;
  const int64_t rows = v.channels_last ? v.N * v.HW : v.N * K;
  const int64_t cols = v.channels_last ? K : v.HW;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bn_act_backward_apply_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto act = activation_as<acc_t>(activation);
    // Per-channel constants, struct of arrays: channels_last reads each as a row.
    std::vector<acc_t> coef(7 * K);
    const acc_t* mean = p.mean.const_data_ptr<acc_t>();
    const acc_t* var = p.var.const_data_ptr<acc_t>();
    const acc_t* gamma = p.gamma.defined() ? p.gamma.const_data_ptr<acc_t>() : nullptr;
    const acc_t* sg = p.training ? p.sum_g.const_data_ptr<acc_t>() : nullptr;
    const acc_t* sgx = p.training ? p.sum_g_xhat.const_data_ptr<acc_t>() : nullptr;
    // In double, each rounded once (fold_channels' reason).
    for (int64_t k = 0; k < K; ++k) {
      const auto c = bn_backward_coeffs<double>(mean[k], var[k], gamma ? gamma[k] : 1.0, p.eps, sg ? sg[k] : 0.0,
                                                sgx ? sgx[k] : 0.0, static_cast<double>(p.count), p.training);
      coef[k] = static_cast<acc_t>(c.mean);
      coef[K + k] = static_cast<acc_t>(c.invstd);
      coef[2 * K + k] = static_cast<acc_t>(c.scale);
      coef[3 * K + k] = static_cast<acc_t>(c.mean_g);
      coef[4 * K + k] = static_cast<acc_t>(c.mean_g_xhat);
    }
    std::vector<acc_t> z_scale, z_shift;  // the forward's BN affine, to recompute z
    fold_channels(ChannelParams{at::Tensor(), p.gamma, p.beta, p.mean, p.var, p.eps}, K, z_scale, z_shift);
    std::copy(z_scale.begin(), z_scale.end(), coef.begin() + 5 * K);
    std::copy(z_shift.begin(), z_shift.end(), coef.begin() + 6 * K);
    const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* op = act.kind == ActKind::kRelu ? out.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    scalar_t* dyp = dy.mutable_data_ptr<scalar_t>();
    scalar_t* drp = d_residual.defined() ? d_residual.mutable_data_ptr<scalar_t>() : nullptr;
    with_flag(v.channels_last, [&](auto cl) {
      with_activation(act.kind, [&](auto kind) {
        with_flag(p.training, [&](auto train) {
          with_flag(drp != nullptr, [&](auto res) {
            backward_apply_loop<scalar_t, cl.value, kind.value, train.value, res.value>(
                gp, op, yp, coef.data(), act, rows, cols, K, dyp, drp);
          });
        });
      });
    });
  });
}

// ---------------------------------------------------------------- bn_update_running_stats_

// running: (K,) contiguous, updated in place; batch: (K,) in running's acc
// type. factor is 1 for the mean (an exact multiply) and M/(M-1) for the var.
void running_stat_cpu(at::Tensor& running, const at::Tensor& batch, double factor, double momentum) {
  const int64_t K = running.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running.scalar_type(), "bn_running_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* rp = running.mutable_data_ptr<scalar_t>();
    const acc_t* bp = batch.const_data_ptr<acc_t>();
    const acc_t f = static_cast<acc_t>(factor), m = static_cast<acc_t>(momentum);
    for (int64_t k = 0; k < K; ++k) {
      rp[k] = static_cast<scalar_t>(running_stat_step(static_cast<acc_t>(rp[k]), bn_unbiased_var(bp[k], f), m));
    }
  });
}

}  // namespace

// The table bn_act.h drives.
const BnActKernels kernels{&stats_cpu, &apply_cpu, &backward_reduce_cpu, &backward_apply_cpu, &running_stat_cpu};

}  // namespace RF_CPU_ISA
