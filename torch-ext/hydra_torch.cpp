// Binds torch tensors to hydra's plain parameter structs and launchers.
// The checks here run before any launch and cost no device sync. They guard direct
// op callers (opcheck, custom pipelines) and hydra.hydra's eager fast path, which
// skips the Python checks (hydra/_validate.py) and runs them only after an op refuses
// its input, for the error that names the argument: so every property the Python
// checks test must be tested here too (README, "The eager hot path").
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <type_traits>
#include <vector>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "hydra_params.h"
#include "torch_binding.h"

namespace {

using hydra::bf16_t;

// Error messages are built here without iostreams. Some toolchains link a private copy
// of libstdc++ into the extension (a JIT build on the lent H100 machines does), and
// then streaming a number through std::ostream (what TORCH_CHECK's message formatting
// does, c10::str) mixes that copy's locale facets with the process's and crashes the
// process instead of raising (NOTES.md v29). A message is one std::string, which
// TORCH_CHECK passes through untouched.
std::string msg_part(const char* s) { return s; }
std::string msg_part(const std::string& s) { return s; }
std::string msg_part(at::ScalarType t) { return c10::toString(t); }
std::string msg_part(const at::Device& d) { return d.str(); }
std::string msg_part(double x) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", x);
  return buf;
}
std::string msg_part(c10::IntArrayRef a) {
  std::string s = "[";
  for (size_t i = 0; i < a.size(); ++i) s += (i ? ", " : "") + std::to_string(a[i]);
  return s + "]";
}
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
std::string msg_part(T x) {
  return std::to_string(x);
}
template <typename... Args>
std::string msg(const Args&... args) {
  std::string s;
  ((s += msg_part(args)), ...);
  return s;
}

}  // namespace

// TORCH_CHECK with a message built by msg() above.
#define HYDRA_CHECK(cond, ...) TORCH_CHECK(cond, msg(__VA_ARGS__))

namespace {

const bf16_t* bf16_ptr(const at::Tensor& t) { return reinterpret_cast<const bf16_t*>(t.data_ptr()); }

// The element type flag of a call: every 16-bit tensor of it is bf16, or every one fp16.
int dtype_flag(const at::Tensor& t, const char* name) {
  HYDRA_CHECK(t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf, "hydra: ", name,
              " must be bf16 or fp16, got ", t.scalar_type());
  return t.scalar_type() == at::kHalf ? hydra::kDtypeF16 : hydra::kDtypeBf16;
}

void check_elem_cuda(const at::Tensor& t, const char* name, at::ScalarType want) {
  HYDRA_CHECK(t.is_cuda(), "hydra: ", name, " must be a CUDA tensor, got device ", t.device());
  HYDRA_CHECK(want == at::kBFloat16 || want == at::kHalf, "hydra: ", name, " must be bf16 or fp16, got ", want);
  HYDRA_CHECK(t.scalar_type() == want, "hydra: ", name, " must be ", want, " like the call's other tensors, got ",
              t.scalar_type());
  HYDRA_CHECK(t.stride(-1) == 1, "hydra: ", name, " must have a contiguous last dimension, got strides ",
              t.strides());
  for (int64_t i = 0; i + 1 < t.dim(); ++i) {  // the kernels move 8 elements (16 bytes) at once
    HYDRA_CHECK(t.stride(i) % 8 == 0, "hydra: ", name, " strides must be multiples of 8 elements (16 bytes), got strides ",
                t.strides());
  }
  HYDRA_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "hydra: ", name,
              " must be 16-byte aligned");
}

// Every tensor of a call lives on the device of its first one (`ref`).
void check_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  HYDRA_CHECK(t.device() == ref.device(), "hydra: ", name, " must be on ", ref_name, "'s device ", ref.device(),
              ", got ", t.device());
}

// Page summaries are stored in the keys' 16-bit type or as e4m3 codes (bytes); anything
// else is refused. Returns the format (the scale is the caller's to set).
hydra::SummaryFormat summary_format(const at::Tensor& t, const char* name, at::ScalarType key_type) {
  HYDRA_CHECK(t.is_cuda(), "hydra: ", name, " must be a CUDA tensor, got device ", t.device());
  HYDRA_CHECK(t.scalar_type() == key_type || t.scalar_type() == at::kFloat8_e4m3fn, "hydra: ", name, " must be ",
              key_type, " like the keys, or float8_e4m3fn, got ", t.scalar_type());
  HYDRA_CHECK(t.stride(-1) == 1, "hydra: ", name, " must have a contiguous last dimension, got strides ", t.strides());
  for (int64_t i = 0; i + 1 < t.dim(); ++i) {  // 16-byte loads of every page's rows
    HYDRA_CHECK(t.stride(i) % 8 == 0, "hydra: ", name, " strides must be multiples of 8 elements, got strides ",
                t.strides());
  }
  HYDRA_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "hydra: ", name, " must be 16-byte aligned");
  hydra::SummaryFormat f;
  f.fp8 = t.scalar_type() == at::kFloat8_e4m3fn ? 1 : 0;
  return f;
}

void check_summary_scale(double scale) {
  int e = 0;
  const double m = std::frexp(scale, &e);
  HYDRA_CHECK(scale > 0 && m == 0.5 && e >= -15 && e <= 17, "hydra: summary_scale must be a power of two in "
              "[2^-16, 2^16], got ", scale);
}

const int* seqlens_ptr(const std::optional<at::Tensor>& s, int64_t B, const at::Device& dev,
                       const char* name = "cache_seqlens") {
  if (!s.has_value()) return nullptr;
  HYDRA_CHECK(s->is_cuda() && s->scalar_type() == at::kInt && s->dim() == 1 && s->size(0) == B &&
                  s->is_contiguous(),
              "hydra: ", name, " must be a contiguous int32 CUDA tensor of shape (", B, ",), got ",
              s->scalar_type(), " ", s->sizes());
  HYDRA_CHECK(s->device() == dev, "hydra: ", name, " must be on the call's device ", dev, ", got ", s->device());
  return s->data_ptr<int>();
}

int ilog2(int64_t x) {
  int r = 0;
  while ((int64_t(1) << r) < x) ++r;
  return r;
}

struct Shapes {
  int B, Hq, Hkv, Tkv, D;
};

Shapes decode_shapes(const at::Tensor& q, const at::Tensor& k) {
  HYDRA_CHECK(q.dim() == 4 && q.size(2) == 1, "hydra: q must be (B, Hq, 1, D), got ", q.sizes());
  HYDRA_CHECK(k.dim() == 4, "hydra: k must be (B, Hkv, Tkv, D), got ", k.sizes());
  Shapes s{(int)q.size(0), (int)q.size(1), (int)k.size(1), (int)k.size(2), (int)q.size(3)};
  HYDRA_CHECK(k.size(0) == s.B && k.size(3) == s.D, "hydra: k ", k.sizes(), " does not match q ", q.sizes());
  HYDRA_CHECK(s.D == 64 || s.D == 128 || s.D == 256, "hydra: head dim D must be 64, 128 or 256, got D=", s.D);
  HYDRA_CHECK(s.Hkv > 0 && s.Hq % s.Hkv == 0, "hydra: Hq=", s.Hq, " must be a multiple of Hkv=", s.Hkv);
  HYDRA_CHECK(s.Hq / s.Hkv <= 16, "hydra: GQA group Hq/Hkv must be <= 16, got Hq=", s.Hq, ", Hkv=", s.Hkv);
  HYDRA_CHECK(s.Tkv >= 1, "hydra: k must hold at least one token, got Tkv=", s.Tkv);
  check_device(k, "k", q, "q");
  return s;
}

void check_page_size(int64_t page_size) {
  HYDRA_CHECK(page_size >= 1 && page_size <= 64 && (page_size & (page_size - 1)) == 0,
              "hydra: page_size must be a power of two in [1, 64], got ", page_size);
}

// Coarse-to-fine selection settings of one call: superpage summaries, superpage size,
// shortlist length (superpages). Inactive (flat selection) when summaries is null.
struct Coarse {
  const at::Tensor* summaries = nullptr;
  int superpage = 0;
  int n_short = 0;
};

int ceil_div(int a, int b) { return (a + b - 1) / b; }

// fp32 score workspace (elements) the selection needs: one score row per (b, h) for
// flat selection; a superpage row, the shortlist (ints) and the compact fine row for
// coarse-to-fine.
size_t selection_floats(const Shapes& s, int n_pages, const Coarse& c) {
  const size_t bh = size_t(s.B) * s.Hkv;
  if (c.summaries == nullptr) return bh * std::max(n_pages, 1);
  return bh * (ceil_div(n_pages, c.superpage) + c.n_short + size_t(c.n_short) * c.superpage);
}

Coarse coarse_args(const std::optional<at::Tensor>& super_summaries, int64_t superpage, int64_t shortlist_pages,
                   const std::optional<at::Tensor>& summaries, const Shapes& s, int n_pages) {
  Coarse c;
  if (!super_summaries.has_value() || superpage <= 1 || !summaries.has_value()) return c;
  const at::Tensor& ss = *super_summaries;
  summary_format(ss, "superpage_summaries", summaries->scalar_type());
  check_device(ss, "superpage_summaries", *summaries, "page_summaries");
  HYDRA_CHECK(ss.scalar_type() == summaries->scalar_type(), "hydra: superpage_summaries must be ",
              summaries->scalar_type(), " like page_summaries, got ", ss.scalar_type());
  HYDRA_CHECK(superpage <= 1024 && (superpage & (superpage - 1)) == 0,
              "hydra: superpage must be a power of two in [2, 1024], got ", superpage);
  const int n_super = ceil_div(n_pages, (int)superpage);
  HYDRA_CHECK(ss.dim() == 5 && ss.size(0) == s.B && ss.size(1) == s.Hkv && ss.size(2) >= n_super &&
                  ss.size(3) == 2 && ss.size(4) == s.D && ss.stride(3) == s.D,
              "hydra: superpage_summaries must be (", s.B, ", ", s.Hkv, ", >=", n_super, ", 2, ", s.D,
              ") with a contiguous (2, D) block, got ", ss.sizes());
  HYDRA_CHECK(shortlist_pages >= 1, "hydra: the shortlist must hold at least one superpage, got ",
              shortlist_pages);
  c.summaries = &ss;
  c.superpage = (int)superpage;
  c.n_short = (int)std::min<int64_t>(shortlist_pages, n_super);
  return c;
}

// Page summaries of a call with queries q: format, device and shape (at least n_pages
// pages: a cache's summaries hold max_pages).
hydra::SummaryFormat check_page_summaries(const at::Tensor& sm, const at::Tensor& q, const Shapes& s, int n_pages) {
  const hydra::SummaryFormat fmt = summary_format(sm, "page_summaries", q.scalar_type());
  check_device(sm, "page_summaries", q, "q");
  HYDRA_CHECK(sm.dim() == 5 && sm.size(0) == s.B && sm.size(1) == s.Hkv && sm.size(2) >= n_pages &&
                  sm.size(3) == 2 && sm.size(4) == s.D && sm.stride(3) == s.D,
              "hydra: page_summaries must be (", s.B, ", ", s.Hkv, ", >=", n_pages, ", 2, ", s.D,
              ") with a contiguous (2, D) block, got ", sm.sizes());
  return fmt;
}

// The scoring parameters of a flat selection from `summaries` (or from k when absent):
// n_sel pages a row, sink and recent pages forced, scores written to `work`. The caller
// has checked the summaries (check_page_summaries).
hydra::ScoreParams score_params(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& summaries,
                                const int* seqlens, const int* leftpad, const Shapes& s, int page_size,
                                int sink_tokens, int recent_tokens, int n_sel, float* work) {
  const int n_pages = (s.Tkv + page_size - 1) / page_size;
  hydra::ScoreParams sp{};
  sp.dtype = dtype_flag(q, "q");
  sp.q = bf16_ptr(q);
  sp.q_batch_stride = q.stride(0);
  sp.q_head_stride = q.stride(1);
  if (summaries.has_value()) {
    const at::Tensor& sm = *summaries;  // checked by the caller (check_page_summaries)
    sp.fmt.fp8 = sm.scalar_type() == at::kFloat8_e4m3fn ? 1 : 0;
    sp.summaries = bf16_ptr(sm);
    sp.s_batch_stride = sm.stride(0);
    sp.s_head_stride = sm.stride(1);
    sp.s_page_stride = sm.stride(2);
  }
  sp.k = bf16_ptr(k);
  sp.k_batch_stride = k.stride(0);
  sp.k_head_stride = k.stride(1);
  sp.k_row_stride = k.stride(2);
  sp.seqlens = seqlens;
  sp.leftpad = leftpad;
  sp.scores = work;
  sp.B = s.B; sp.Hq = s.Hq; sp.Hkv = s.Hkv; sp.group = s.Hq / s.Hkv; sp.Tkv = s.Tkv; sp.D = s.D;
  sp.n_pages = n_pages; sp.page_size = page_size;
  sp.sink_pages = (sink_tokens + page_size - 1) / page_size;
  sp.recent_tokens = recent_tokens;
  sp.n_sel = n_sel;
  return sp;
}

// Fills the score/select parameters and runs the selection into `pages_out`: score and
// select (flat), or score superpages, shortlist, score their fine pages, select
// (coarse-to-fine). `work` holds selection_floats() floats. Returns the summary bytes
// its last launch reads (0 unless that launch scores: the fused cluster kernel), which
// stream through L2 while the attention's first CTAs may already run.
int64_t run_selection(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& summaries,
                      const int* seqlens, const int* leftpad, const Shapes& s, int page_size, int sink_tokens,
                      int recent_tokens, int n_sel, int* pages_out, int* counters, float* work, cudaStream_t stream,
                      const hydra::CacheWriteParams* append = nullptr, int* lens_out = nullptr,
                      const Coarse& coarse = Coarse()) {
  const int n_pages = (s.Tkv + page_size - 1) / page_size;
  hydra::ScoreParams sp = score_params(q, k, summaries, seqlens, leftpad, s, page_size, sink_tokens, recent_tokens,
                                       n_sel, work);
  if (append != nullptr) {
    sp.len_add = 1;
    sp.k_new = append->k_src;
    sp.kn_batch_stride = append->ks_batch_stride;
    sp.kn_head_stride = append->ks_head_stride;
    sp.append = *append;  // the first score kernel's extra CTAs write the token
    sp.fmt.scale = append->fmt.scale;  // how the append stores the key (the scorer folds it the same way)
  }

  hydra::SelectParams se{};
  se.dtype = sp.dtype;
  se.scores = work;
  se.seqlens = seqlens;
  se.leftpad = leftpad;
  se.pages = pages_out;
  se.counters = counters;
  se.B = s.B; se.Hkv = s.Hkv; se.Tkv = s.Tkv; se.n_pages = n_pages; se.page_size = page_size;
  se.sink_pages = sp.sink_pages; se.recent_tokens = recent_tokens; se.n_sel = n_sel;
  se.n_out = n_sel;
  se.n_scores = n_pages;
  if (append != nullptr) {
    se.len_add = 1;
    se.lens_out = lens_out;
  }
  if (coarse.summaries == nullptr) {
    // Long rows: the fused cluster kernel scores 16-bit summaries where its cluster's SMs
    // read them fast enough (plan.fused); otherwise (e4m3 summaries, or few rows of wide
    // pages) the score kernel runs on every SM and the cluster only selects.
    // H100, B = 1, graph step (NOTES.md v16): e4m3 at 524k 79.7 -> 73.4 us, at 1M 133 -> 106.
    const bool fp8 = summaries.has_value() && sp.fmt.fp8;
    const hydra::ClusterPlan plan =
        summaries.has_value()
            ? hydra::plan_score_select_cluster(n_pages, s.B * s.Hkv, int(summaries->element_size()) * 2 * s.D, fp8)
            : hydra::ClusterPlan{};
    if (plan.fused) {  // sm_90+: scoring and selection in one cluster launch
      hydra::launch_score_select_cluster(sp, se, plan, stream);
      return int64_t(n_pages) * summaries->element_size() * 2 * s.D * s.B * s.Hkv;
    }
    hydra::launch_score_pages(sp, stream);
    if (plan.ctas > 0) {  // the scores above, selected over a cluster
      hydra::ScoreParams sel = sp;
      sel.append = hydra::CacheWriteParams{};  // the score kernel wrote the token
      hydra::launch_score_select_cluster(sel, se, plan, stream);
      return 0;
    }
    hydra::launch_select_pages(se, stream);
    return 0;
  }
  // Coarse-to-fine: workspace = superpage scores | shortlist (int) | compact fine scores.
  const int S = coarse.superpage, n_super = ceil_div(n_pages, S), n_short = coarse.n_short;
  const size_t bh = size_t(s.B) * s.Hkv;
  float* scores1 = work;
  int* shortlist = reinterpret_cast<int*>(work + bh * n_super);
  float* scores2 = work + bh * (n_super + n_short);
  const at::Tensor& ss = *coarse.summaries;

  hydra::ScoreParams s1 = sp;
  s1.summaries = bf16_ptr(ss);
  s1.s_batch_stride = ss.stride(0);
  s1.s_head_stride = ss.stride(1);
  s1.s_page_stride = ss.stride(2);
  s1.superpage = S;
  s1.n_pages = n_super;
  s1.scores = scores1;
  hydra::launch_score_pages(s1, stream);

  hydra::SelectParams e1 = se;
  e1.mode = 1;
  e1.scores = scores1;
  e1.n_scores = n_super;
  e1.pages = shortlist;
  e1.n_out = n_short;
  e1.superpage = S;
  e1.counters = nullptr;
  e1.len_add = se.len_add;
  e1.lens_out = nullptr;  // the final select publishes the step's lengths
  hydra::launch_select_pages(e1, stream);

  hydra::ScoreParams s2 = sp;
  s2.append = hydra::CacheWriteParams{};  // stage 1 wrote the token
  s2.superpage = S;
  s2.shortlist = shortlist;
  s2.n_short = n_short;
  s2.n_pages = n_short * S;
  s2.scores = scores2;
  hydra::launch_score_pages(s2, stream);

  hydra::SelectParams e2 = se;
  e2.mode = 2;
  e2.scores = scores2;
  e2.n_scores = n_short * S;
  e2.superpage = S;
  e2.shortlist = shortlist;
  e2.n_short = n_short;
  hydra::launch_select_pages(e2, stream);
  return 0;
}

// Carves one byte buffer into aligned pieces: one allocator call per step.
struct Workspace {
  std::vector<size_t> offsets;
  size_t total = 0;
  size_t add(size_t bytes) {
    total = (total + 255) / 256 * 256;
    offsets.push_back(total);
    total += bytes;
    return offsets.size() - 1;
  }
};

}  // namespace

void page_summaries(const at::Tensor& k, const std::optional<at::Tensor>& cache_seqlens,
                    const std::optional<at::Tensor>& cache_leftpad, int64_t page_size, double summary_scale,
                    at::Tensor& out) {
  check_elem_cuda(k, "k", k.scalar_type());
  hydra::SummaryFormat fmt = summary_format(out, "out", k.scalar_type());
  check_device(out, "out", k, "k");
  check_summary_scale(summary_scale);
  fmt.scale = (float)summary_scale;
  check_page_size(page_size);
  HYDRA_CHECK(k.dim() == 4, "hydra: k must be (B, Hkv, Tkv, D), got ", k.sizes());
  const int n_pages = (int)((k.size(2) + page_size - 1) / page_size);
  HYDRA_CHECK(out.dim() == 5 && out.size(0) == k.size(0) && out.size(1) == k.size(1) && out.size(2) >= n_pages &&
                  out.size(3) == 2 && out.size(4) == k.size(3) && out.stride(3) == k.size(3),
              "hydra: page_summaries out must be (B, Hkv, >=", n_pages, ", 2, D) with a contiguous (2, D) block, got ",
              out.sizes());
  const c10::cuda::CUDAGuard guard(k.device());
  hydra::SummaryParams p{};
  p.dtype = dtype_flag(k, "k");
  p.k = bf16_ptr(k);
  p.k_batch_stride = k.stride(0);
  p.k_head_stride = k.stride(1);
  p.k_row_stride = k.stride(2);
  p.seqlens = seqlens_ptr(cache_seqlens, k.size(0), k.device());
  p.leftpad = seqlens_ptr(cache_leftpad, k.size(0), k.device(), "cache_leftpad");
  p.out = reinterpret_cast<bf16_t*>(out.data_ptr());
  p.o_batch_stride = out.stride(0);
  p.o_head_stride = out.stride(1);
  p.o_page_stride = out.stride(2);
  p.B = (int)k.size(0); p.Hkv = (int)k.size(1); p.Tkv = (int)k.size(2); p.D = (int)k.size(3);
  p.n_pages = n_pages;
  p.page_size = (int)page_size;
  p.fmt = fmt;
  if (p.B == 0 || p.Hkv == 0 || n_pages == 0) return;
  hydra::launch_page_summaries(p, c10::cuda::getCurrentCUDAStream());
}

void select_pages(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& summaries,
                  const std::optional<at::Tensor>& super_summaries, const std::optional<at::Tensor>& cache_seqlens,
                  const std::optional<at::Tensor>& cache_leftpad, int64_t page_size, int64_t superpage, int64_t shortlist_pages, int64_t sink_tokens,
                  int64_t recent_tokens, int64_t budget_tokens, at::Tensor& pages) {
  check_elem_cuda(q, "q", q.scalar_type());
  check_elem_cuda(k, "k", q.scalar_type());
  check_page_size(page_size);
  const Shapes s = decode_shapes(q, k);
  HYDRA_CHECK(budget_tokens > 0 && budget_tokens % page_size == 0,
              "hydra: budget_tokens must be a positive multiple of page_size, got ", budget_tokens);
  const int n_sel = (int)(budget_tokens / page_size);
  HYDRA_CHECK(pages.is_cuda() && pages.scalar_type() == at::kInt && pages.is_contiguous() && pages.dim() == 3 &&
                  pages.size(0) == s.B && pages.size(1) == s.Hkv && pages.size(2) == n_sel,
              "hydra: pages must be a contiguous int32 CUDA tensor (", s.B, ", ", s.Hkv, ", ", n_sel, "), got ",
              pages.scalar_type(), " ", pages.sizes());
  check_device(pages, "pages", q, "q");
  const c10::cuda::CUDAGuard guard(q.device());
  const int n_pages = (s.Tkv + (int)page_size - 1) / (int)page_size;
  if (summaries.has_value()) check_page_summaries(*summaries, q, s, n_pages);
  const Coarse coarse = coarse_args(super_summaries, superpage, shortlist_pages, summaries, s, n_pages);
  at::Tensor scores = at::empty({(int64_t)selection_floats(s, n_pages, coarse)}, q.options().dtype(at::kFloat));
  run_selection(q, k, summaries, seqlens_ptr(cache_seqlens, s.B, q.device()),
                seqlens_ptr(cache_leftpad, s.B, q.device(), "cache_leftpad"),
                s, (int)page_size, (int)sink_tokens,
                (int)recent_tokens, n_sel, pages.data_ptr<int>(), nullptr, scores.data_ptr<float>(),
                c10::cuda::getCurrentCUDAStream(), nullptr, nullptr, coarse);
}

namespace {

// One decode step; `append` (HydraKVCache.step) first appends one token per sequence
// to the cache that k/v view, fused into the first score launch when the step selects.
// The caller has checked q (check_elem_cuda) and run decode_shapes(q, k) into `s`.
void decode_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const std::optional<at::Tensor>& pages, const std::optional<at::Tensor>& summaries,
                 const std::optional<at::Tensor>& super_summaries, int64_t superpage, int64_t shortlist_pages,
                 const int* seqlens, const int* leftpad, int64_t page_size, int64_t sink_tokens,
                 int64_t recent_tokens,
                 int64_t budget_tokens, int64_t window, double scale, at::Tensor& out, at::Tensor& lse,
                 const hydra::CacheWriteParams* append, const Shapes& s) {
  check_elem_cuda(k, "k", q.scalar_type());
  check_elem_cuda(v, "v", q.scalar_type());
  check_elem_cuda(out, "out", q.scalar_type());
  check_page_size(page_size);
  HYDRA_CHECK(v.sizes() == k.sizes(), "hydra: v ", v.sizes(), " must match k ", k.sizes());
  HYDRA_CHECK(out.sizes() == q.sizes(), "hydra: out ", out.sizes(), " must match q ", q.sizes());
  HYDRA_CHECK(lse.is_cuda() && lse.scalar_type() == at::kFloat && lse.is_contiguous() &&
                  lse.numel() == (int64_t)s.B * s.Hq,
              "hydra: lse must be a contiguous fp32 CUDA tensor of B*Hq elements, got ", lse.sizes());
  HYDRA_CHECK(window >= 0, "hydra: window must be >= 0, got ", window);
  check_device(v, "v", q, "q");
  check_device(out, "out", q, "q");
  check_device(lse, "lse", q, "q");
  const int P = (int)page_size;
  const int n_pages = (s.Tkv + P - 1) / P;
  // Checked whatever the step does with them (a step that attends every token ignores
  // them), so that a bad argument is refused alike on every path.
  if (summaries.has_value()) check_page_summaries(*summaries, q, s, n_pages);
  // The superpage summaries too (with a superpage > 1 and page summaries), before any
  // launch; only a selecting step uses them (coarse below).
  const Coarse given_coarse = coarse_args(super_summaries, superpage, shortlist_pages, summaries, s, n_pages);
  if (s.B == 0 || s.Hq == 0) return;
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  // Which entries the attention walks.
  enum { kExplicit, kSelect, kRange } mode;
  int n_entries;
  if (pages.has_value()) {
    mode = kExplicit;
    const at::Tensor& pg = *pages;
    HYDRA_CHECK(pg.is_cuda() && pg.scalar_type() == at::kInt && pg.dim() == 3 && pg.size(0) == s.B &&
                    pg.size(1) == s.Hkv && pg.stride(2) == 1,
                "hydra: pages must be an int32 CUDA tensor (", s.B, ", ", s.Hkv,
                ", n) with a contiguous last dimension, got ", pg.scalar_type(), " ", pg.sizes());
    check_device(pg, "pages", q, "q");
    n_entries = (int)pg.size(2);
  } else if (budget_tokens > 0 && s.Tkv > budget_tokens && window == 0) {
    HYDRA_CHECK(budget_tokens % P == 0, "hydra: budget_tokens must be a multiple of page_size, got ",
                budget_tokens);
    mode = kSelect;
    n_entries = (int)(budget_tokens / P);
  } else {
    mode = kRange;
    n_entries = window > 0 ? std::min<int64_t>(n_pages, (window + P - 1) / P + 1) : n_pages;
  }
  if (n_entries == 0) n_entries = 1;  // still write the (empty-set) output
  const bool fused_append = append != nullptr && mode == kSelect;
  if (append != nullptr && !fused_append) hydra::launch_cache_append(*append, stream);

  // Split the entries so that B * Hkv * splits fills the GPU's CTA slots (two per SM)
  // in one wave: rounding down avoids a nearly empty second wave.
  const int ept = hydra::kTileTokens / P;
  const int tiles = (n_entries + ept - 1) / ept;
  const int slots = 2 * hydra::device_sm_count();  // q's device: the caller's guard set it
  // At least 4 tiles per split, so a CTA's fixed costs (page staging, the merge) stay small.
  // (Measured on the H200: 2 or 1 tiles per split cost 0.5-2.3 us more at B=1 than 4.)
  int splits = std::max(1, std::min((tiles + 3) / 4, slots / (s.B * s.Hkv)));
  if (mode != kRange) {  // a split's page indices are staged in shared memory
    splits = std::max(splits, (n_entries + hydra::kMaxEntriesPerSplit - 1) / hydra::kMaxEntriesPerSplit);
  }
  int per_split = (n_entries + splits - 1) / splits;
  per_split = (per_split + ept - 1) / ept * ept;
  if (mode != kRange && per_split > hydra::kMaxEntriesPerSplit) per_split = hydra::kMaxEntriesPerSplit / ept * ept;
  splits = (n_entries + per_split - 1) / per_split;

  const Coarse coarse = mode == kSelect ? given_coarse : Coarse();

  hydra::DecodeParams p{};
  p.dtype = dtype_flag(q, "q");
  p.q = bf16_ptr(q);
  p.q_batch_stride = q.stride(0);
  p.q_head_stride = q.stride(1);
  p.k = bf16_ptr(k);
  p.v = bf16_ptr(v);
  p.k_batch_stride = k.stride(0); p.k_head_stride = k.stride(1); p.k_row_stride = k.stride(2);
  p.v_batch_stride = v.stride(0); p.v_head_stride = v.stride(1); p.v_row_stride = v.stride(2);
  p.seqlens = seqlens;
  p.leftpad = leftpad;
  p.out = reinterpret_cast<bf16_t*>(out.data_ptr());
  p.o_batch_stride = out.stride(0);
  p.o_head_stride = out.stride(1);
  p.lse = lse.data_ptr<float>();
  p.B = s.B; p.Hq = s.Hq; p.Hkv = s.Hkv; p.group = s.Hq / s.Hkv; p.Tkv = s.Tkv; p.D = s.D;
  p.page_size = P;
  p.log2_page = ilog2(P);
  p.n_entries = n_entries;
  p.window = mode == kRange ? (int)window : 0;
  p.n_splits = splits;
  p.entries_per_split = per_split;
  p.scale_log2 = (float)(scale * 1.4426950408889634);

  // Short rows of flat selection from cached summaries (16-bit or e4m3): the whole step
  // in one cluster launch, with this split plan (short_step.cuh), where every row's
  // cluster fits at once.
  if (mode == kSelect && append == nullptr && coarse.summaries == nullptr && summaries.has_value() &&
      hydra::short_step_fits(s.D, n_pages, s.B * s.Hkv, splits, p.dtype)) {
    const hydra::ScoreParams sp = score_params(q, k, summaries, seqlens, leftpad, s, P, (int)sink_tokens,
                                               (int)recent_tokens, n_entries, nullptr);
    hydra::launch_short_step(sp, p, stream);
    return;
  }

  Workspace ws;
  const size_t i_scores = ws.add(mode == kSelect ? sizeof(float) * selection_floats(s, n_pages, coarse) : 0);
  const size_t i_pages = ws.add(mode == kSelect ? sizeof(int) * s.B * s.Hkv * n_entries : 0);
  const size_t i_part_o = ws.add(splits > 1 ? sizeof(float) * s.B * s.Hq * splits * s.D : 0);
  const size_t i_part_lse = ws.add(splits > 1 ? sizeof(float) * s.B * s.Hq * splits : 0);
  const size_t i_counters = ws.add(splits > 1 ? sizeof(int) * s.B * s.Hkv : 0);
  const size_t i_lens = ws.add(fused_append ? sizeof(int) * s.B : 0);
  at::Tensor buf = at::empty({(int64_t)std::max<size_t>(ws.total, 1)}, q.options().dtype(at::kByte));
  char* base = reinterpret_cast<char*>(buf.data_ptr());
  auto at_off = [&](size_t i) { return base + ws.offsets[i]; };
  int* counters = splits > 1 ? reinterpret_cast<int*>(at_off(i_counters)) : nullptr;

  if (mode == kSelect) {
    int* sel = reinterpret_cast<int*>(at_off(i_pages));
    int* lens = fused_append ? reinterpret_cast<int*>(at_off(i_lens)) : nullptr;
    const int64_t streamed =
        run_selection(q, k, summaries, seqlens, leftpad, s, P, (int)sink_tokens, (int)recent_tokens, n_entries, sel,
                      counters, reinterpret_cast<float*>(at_off(i_scores)), stream, fused_append ? append : nullptr,
                      lens, coarse);
    // The attention may prefetch the sink and recent rows while the selection runs, unless
    // the selection's launch then streams more summary bytes than L2 holds, which would
    // push those rows out before they are read (H100, NOTES.md v24: B = 1 at 524k, 134 MB
    // of 16-bit summaries through the fused cluster kernel, lost 1.1 us with the prefetch).
    p.l2_prefetch = streamed == 0 || streamed <= hydra::device_l2_bytes() ? 1 : 0;  // 0: no device query
    p.prefetch_seqlens = seqlens;  // the selection's lengths: the cache's, before the fused append
    p.prefetch_len_add = fused_append ? 1 : 0;
    p.prefetch_sink_tokens = ((int)sink_tokens + P - 1) / P * P;  // whole sink pages
    p.prefetch_recent_tokens = (int)recent_tokens;
    if (fused_append) {  // the attention reads the step's lengths; it writes them to the cache
      seqlens = lens;
      p.lengths_out = append->lengths;
    }
    p.pages = sel;
    p.p_batch_stride = (int64_t)s.Hkv * n_entries;
    p.p_head_stride = n_entries;
  } else {
    if (counters != nullptr) {
      cudaMemsetAsync(counters, 0, sizeof(int) * s.B * s.Hkv, stream);
    }
    if (mode == kExplicit) {
      p.pages = pages->data_ptr<int>();
      p.p_batch_stride = pages->stride(0);
      p.p_head_stride = pages->stride(1);
    }
  }
  p.seqlens = seqlens;  // the fused append's lengths, when it runs
  p.part_o = splits > 1 ? reinterpret_cast<float*>(at_off(i_part_o)) : nullptr;
  p.part_lse = splits > 1 ? reinterpret_cast<float*>(at_off(i_part_lse)) : nullptr;
  p.counters = counters;
  hydra::launch_sparse_decode(p, stream);
}

}  // namespace

void decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& pages,
            const std::optional<at::Tensor>& summaries, const std::optional<at::Tensor>& super_summaries,
            const std::optional<at::Tensor>& cache_seqlens, const std::optional<at::Tensor>& cache_leftpad,
            int64_t page_size, int64_t superpage,
            int64_t shortlist_pages, int64_t sink_tokens, int64_t recent_tokens, int64_t budget_tokens,
            int64_t window, double scale, at::Tensor& out, at::Tensor& lse) {
  check_elem_cuda(q, "q", q.scalar_type());
  const Shapes s = decode_shapes(q, k);
  decode_impl(q, k, v, pages, summaries, super_summaries, superpage, shortlist_pages,
              seqlens_ptr(cache_seqlens, s.B, q.device()), seqlens_ptr(cache_leftpad, s.B, q.device(), "cache_leftpad"),
              page_size,
              sink_tokens,
              recent_tokens, budget_tokens, window, scale, out, lse, nullptr, s);
}

std::tuple<at::Tensor, at::Tensor> decode_alloc(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                const std::optional<at::Tensor>& pages,
                                                const std::optional<at::Tensor>& summaries,
                                                const std::optional<at::Tensor>& super_summaries,
                                                const std::optional<at::Tensor>& cache_seqlens,
                                                const std::optional<at::Tensor>& cache_leftpad, int64_t page_size,
                                                int64_t superpage, int64_t shortlist_pages,
                                                int64_t sink_tokens, int64_t recent_tokens, int64_t budget_tokens,
                                                int64_t window, double scale) {
  HYDRA_CHECK(q.dim() == 4, "hydra: q must be (B, Hq, 1, D), got ", q.sizes());
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2), q.size(3)}, q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  decode(q, k, v, pages, summaries, super_summaries, cache_seqlens, cache_leftpad, page_size, superpage,
         shortlist_pages,
         sink_tokens, recent_tokens, budget_tokens, window, scale, out, lse);
  return {out, lse};
}

namespace {

hydra::CacheWriteParams cache_params(const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& counts,
                                     int64_t page_size, at::Tensor& k_cache, at::Tensor& v_cache,
                                     at::Tensor& summaries, at::Tensor& lengths, at::Tensor& overflow,
                                     double summary_scale,
                                     const std::optional<at::Tensor>& super_summaries = std::nullopt,
                                     int64_t superpage = 0) {
  const at::ScalarType et = k_cache.scalar_type();
  for (auto* t : {&k, &v}) check_elem_cuda(*t, "new k/v", et);
  check_elem_cuda(k_cache, "k_cache", et);
  check_elem_cuda(v_cache, "v_cache", et);
  hydra::SummaryFormat fmt = summary_format(summaries, "summaries", et);
  check_device(k, "new k", k_cache, "k_cache");
  check_device(v, "new v", k_cache, "k_cache");
  check_device(v_cache, "v_cache", k_cache, "k_cache");
  check_device(summaries, "summaries", k_cache, "k_cache");
  check_device(lengths, "lengths", k_cache, "k_cache");
  check_device(overflow, "overflow", k_cache, "k_cache");
  check_summary_scale(summary_scale);
  fmt.scale = (float)summary_scale;
  check_page_size(page_size);
  HYDRA_CHECK(k.dim() == 4 && v.sizes() == k.sizes() && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() &&
                  k.size(0) == k_cache.size(0) && k.size(1) == k_cache.size(1) && k.size(3) == k_cache.size(3),
              "hydra: new k/v ", k.sizes(), " do not fit the cache ", k_cache.sizes());
  const int64_t max_pages = (k_cache.size(2) + page_size - 1) / page_size;
  HYDRA_CHECK(summaries.dim() == 5 && summaries.size(0) == k.size(0) && summaries.size(1) == k.size(1) &&
                  summaries.size(2) == max_pages && summaries.size(3) == 2 && summaries.size(4) == k.size(3) &&
                  summaries.stride(3) == k.size(3),
              "hydra: cache summaries must be (B, Hkv, ", max_pages, ", 2, D), got ", summaries.sizes());
  HYDRA_CHECK(lengths.is_cuda() && lengths.scalar_type() == at::kInt && lengths.is_contiguous() &&
                  lengths.numel() == k.size(0),
              "hydra: cache lengths must be a contiguous int32 CUDA tensor of B elements");
  HYDRA_CHECK(overflow.is_cuda() && overflow.scalar_type() == at::kInt && overflow.numel() >= 1,
              "hydra: cache overflow flag must be an int32 CUDA tensor");
  hydra::CacheWriteParams p{};
  p.dtype = dtype_flag(k_cache, "k_cache");
  p.k_src = bf16_ptr(k);
  p.v_src = bf16_ptr(v);
  p.ks_batch_stride = k.stride(0); p.ks_head_stride = k.stride(1); p.ks_row_stride = k.stride(2);
  p.vs_batch_stride = v.stride(0); p.vs_head_stride = v.stride(1); p.vs_row_stride = v.stride(2);
  p.k_cache = reinterpret_cast<bf16_t*>(k_cache.data_ptr());
  p.v_cache = reinterpret_cast<bf16_t*>(v_cache.data_ptr());
  p.kc_batch_stride = k_cache.stride(0); p.kc_head_stride = k_cache.stride(1); p.kc_row_stride = k_cache.stride(2);
  p.vc_batch_stride = v_cache.stride(0); p.vc_head_stride = v_cache.stride(1); p.vc_row_stride = v_cache.stride(2);
  p.summaries = reinterpret_cast<bf16_t*>(summaries.data_ptr());
  p.s_batch_stride = summaries.stride(0); p.s_head_stride = summaries.stride(1); p.s_page_stride = summaries.stride(2);
  p.lengths = lengths.data_ptr<int>();
  p.counts = seqlens_ptr(counts, k.size(0), k_cache.device(), "counts");
  p.overflow = overflow.data_ptr<int>();
  p.B = (int)k.size(0); p.Hkv = (int)k.size(1); p.D = (int)k.size(3); p.n_src = (int)k.size(2);
  p.max_seq_len = (int)k_cache.size(2);
  p.max_pages = (int)max_pages;
  p.page_size = (int)page_size;
  p.fmt = fmt;
  if (super_summaries.has_value() && superpage > 1) {
    const at::Tensor& ss = *super_summaries;
    summary_format(ss, "superpage_summaries", et);
    check_device(ss, "superpage_summaries", k_cache, "k_cache");
    HYDRA_CHECK(ss.scalar_type() == summaries.scalar_type(), "hydra: cache superpage summaries must be ",
                summaries.scalar_type(), " like its page summaries, got ", ss.scalar_type());
    const int64_t max_super = (max_pages + superpage - 1) / superpage;
    HYDRA_CHECK(ss.dim() == 5 && ss.size(0) == k.size(0) && ss.size(1) == k.size(1) && ss.size(2) == max_super &&
                    ss.size(3) == 2 && ss.size(4) == k.size(3) && ss.stride(3) == k.size(3),
                "hydra: cache superpage summaries must be (B, Hkv, ", max_super, ", 2, D), got ", ss.sizes());
    p.super_summaries = reinterpret_cast<bf16_t*>(ss.data_ptr());
    p.ss_batch_stride = ss.stride(0); p.ss_head_stride = ss.stride(1); p.ss_page_stride = ss.stride(2);
    p.superpage = (int)superpage;
  }
  return p;
}

}  // namespace

void cache_prefill(const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& seqlens,
                   int64_t page_size, at::Tensor& k_cache, at::Tensor& v_cache, at::Tensor& summaries,
                   at::Tensor& lengths, at::Tensor& overflow, double summary_scale) {
  HYDRA_CHECK(k.dim() == 4 && k.size(2) <= k_cache.size(2), "hydra: prefill of ", k.size(2),
              " tokens does not fit max_seq_len=", k_cache.size(2));
  const c10::cuda::CUDAGuard guard(k_cache.device());
  const hydra::CacheWriteParams p =
      cache_params(k, v, seqlens, page_size, k_cache, v_cache, summaries, lengths, overflow, summary_scale);
  if (p.B == 0 || p.Hkv == 0) return;
  hydra::launch_cache_prefill(p, c10::cuda::getCurrentCUDAStream());
}

void cache_append(const at::Tensor& k_new, const at::Tensor& v_new, const std::optional<at::Tensor>& counts,
                  int64_t page_size, at::Tensor& k_cache, at::Tensor& v_cache, at::Tensor& summaries,
                  const std::optional<at::Tensor>& super_summaries, int64_t superpage, at::Tensor& lengths,
                  at::Tensor& overflow, double summary_scale) {
  const c10::cuda::CUDAGuard guard(k_cache.device());
  const hydra::CacheWriteParams p = cache_params(k_new, v_new, counts, page_size, k_cache, v_cache, summaries,
                                                 lengths, overflow, summary_scale, super_summaries, superpage);
  if (p.B == 0 || p.Hkv == 0) return;
  hydra::launch_cache_append(p, c10::cuda::getCurrentCUDAStream());
}

void decode_append(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new, at::Tensor& k_cache,
                   at::Tensor& v_cache, at::Tensor& summaries, const std::optional<at::Tensor>& super_summaries,
                   at::Tensor& lengths, at::Tensor& overflow, int64_t page_size, int64_t superpage,
                   int64_t shortlist_pages, int64_t sink_tokens, int64_t recent_tokens, int64_t budget_tokens,
                   int64_t window, double scale, double summary_scale, at::Tensor& out, at::Tensor& lse) {
  HYDRA_CHECK(k_new.dim() == 4 && k_new.size(2) == 1, "hydra: a fused step appends one token per sequence: k_new "
              "must be (B, Hkv, 1, D), got ", k_new.sizes());
  const c10::cuda::CUDAGuard guard(k_cache.device());
  const hydra::CacheWriteParams cw = cache_params(k_new, v_new, std::nullopt, page_size, k_cache, v_cache, summaries,
                                                  lengths, overflow, summary_scale, super_summaries, superpage);
  check_elem_cuda(q, "q", q.scalar_type());
  const Shapes s = decode_shapes(q, k_cache);
  decode_impl(q, k_cache, v_cache, std::nullopt, summaries, super_summaries, superpage, shortlist_pages,
              lengths.data_ptr<int>(), nullptr, page_size, sink_tokens, recent_tokens, budget_tokens, window, scale,
              out, lse, &cw, s);
}

std::tuple<at::Tensor, at::Tensor> decode_append_alloc(
    const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new, at::Tensor& k_cache, at::Tensor& v_cache,
    at::Tensor& summaries, const std::optional<at::Tensor>& super_summaries, at::Tensor& lengths,
    at::Tensor& overflow, int64_t page_size, int64_t superpage, int64_t shortlist_pages, int64_t sink_tokens,
    int64_t recent_tokens, int64_t budget_tokens, int64_t window, double scale, double summary_scale) {
  HYDRA_CHECK(q.dim() == 4, "hydra: q must be (B, Hq, 1, D), got ", q.sizes());
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2), q.size(3)}, q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  decode_append(q, k_new, v_new, k_cache, v_cache, summaries, super_summaries, lengths, overflow, page_size,
                superpage, shortlist_pages, sink_tokens, recent_tokens, budget_tokens, window, scale, summary_scale,
                out, lse);
  return {out, lse};
}

namespace {

// Causal prefill: block summaries, selection (when the call selects) and attention.
// blocks_out: where the selection goes (the prefill_blocks op), or null (a workspace).
void prefill_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t sink_tokens,
                  int64_t recent_tokens, int64_t budget_tokens, int64_t window, double scale, at::Tensor* out,
                  at::Tensor* lse, at::Tensor* blocks_out) {
  check_elem_cuda(q, "q", q.scalar_type());
  check_elem_cuda(k, "k", q.scalar_type());
  if (out != nullptr) {
    check_elem_cuda(v, "v", q.scalar_type());
    check_elem_cuda(*out, "out", q.scalar_type());
  }
  HYDRA_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "hydra: prefill q, k, v must be 4-D");
  const int B = (int)q.size(0), Hq = (int)q.size(1), Tq = (int)q.size(2), D = (int)q.size(3);
  const int Hkv = (int)k.size(1), Tkv = (int)k.size(2);
  HYDRA_CHECK(k.size(0) == B && k.size(3) == D && Hkv > 0 && Hq % Hkv == 0 && Hq / Hkv <= 16,
              "hydra: prefill k ", k.sizes(), " does not fit q ", q.sizes());
  HYDRA_CHECK(v.sizes() == k.sizes(), "hydra: v ", v.sizes(), " must match k ", k.sizes());
  check_device(k, "k", q, "q");
  check_device(v, "v", q, "q");
  if (out != nullptr) {
    check_device(*out, "out", q, "q");
    check_device(*lse, "lse", q, "q");
  }
  if (blocks_out != nullptr) check_device(*blocks_out, "blocks", q, "q");
  HYDRA_CHECK(D == 64 || D == 128 || D == 256, "hydra: the prefill kernel takes head dim 64, 128 or 256, got D=", D);
  if (D == 256) {  // 2 stages of 64-token K and V tiles at D = 256, plus the block list
    int optin = 0;
    cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, q.get_device());
    const int need = 2 * 2 * 64 * (256 + 8) * 2 + 4112;
    HYDRA_CHECK(optin >= need, "hydra: the D=256 prefill kernel needs ", need, " bytes of shared memory per block; ",
                "this GPU offers ", optin, " (A100, H100 and newer data-center GPUs have enough)");
  }
  HYDRA_CHECK(Tq >= 1 && Tq <= Tkv, "hydra: prefill needs 1 <= Tq <= Tkv, got Tq=", Tq, ", Tkv=", Tkv);
  HYDRA_CHECK(window >= 0, "hydra: window must be >= 0, got ", window);
  const int nbq = ceil_div(Tq, hydra::kPrefillBlock), nbk = ceil_div(Tkv, hydra::kPrefillBlock);
  HYDRA_CHECK(nbq <= 65535 && B <= 65535, "hydra: prefill takes at most 65535 query blocks (", 65535 * 64,
              " tokens) and 65535 sequences, got Tq=", Tq, ", B=", B);
  const bool select = budget_tokens > 0 && window == 0 && Tkv > budget_tokens;
  int n_list = 0;
  if (select) {
    HYDRA_CHECK(budget_tokens % hydra::kPrefillBlock == 0 && budget_tokens / hydra::kPrefillBlock <= hydra::kMaxPrefillList,
                "hydra: prefill budget_tokens must be a multiple of 64 and at most ", hydra::kMaxPrefillList * 64,
                ", got ", budget_tokens);
    n_list = (int)(budget_tokens / hydra::kPrefillBlock);
    const int forced = ceil_div((int)sink_tokens, hydra::kPrefillBlock) + (int)(recent_tokens / hydra::kPrefillBlock) + 1;
    HYDRA_CHECK(forced < n_list, "hydra: prefill budget_tokens=", budget_tokens, " leaves no block to select after ",
                sink_tokens, " sink and ", recent_tokens, " recent tokens");
    int smem_optin = 0;
    cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, q.get_device());
    HYDRA_CHECK(size_t(nbk) * 4 + 16 * 1024 <= size_t(smem_optin),
                "hydra: prefill selection holds one score per key block in shared memory; Tkv=", Tkv, " is too long");
  }
  if (out != nullptr) {
    HYDRA_CHECK(out->sizes() == q.sizes() && out->stride(-1) == 1, "hydra: out ", out->sizes(), " must match q ",
                q.sizes());
    HYDRA_CHECK(lse->is_cuda() && lse->scalar_type() == at::kFloat && lse->is_contiguous() &&
                    lse->numel() == (int64_t)B * Hq * Tq,
                "hydra: lse must be a contiguous fp32 CUDA tensor of B*Hq*Tq elements, got ", lse->sizes());
  }
  if (B == 0 || Hq == 0) return;
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  hydra::PrefillParams p{};
  p.dtype = dtype_flag(q, "q");
  p.q = bf16_ptr(q);
  p.q_batch_stride = q.stride(0); p.q_head_stride = q.stride(1); p.q_row_stride = q.stride(2);
  p.k = bf16_ptr(k);
  p.v = bf16_ptr(v);
  p.k_batch_stride = k.stride(0); p.k_head_stride = k.stride(1); p.k_row_stride = k.stride(2);
  p.v_batch_stride = v.stride(0); p.v_head_stride = v.stride(1); p.v_row_stride = v.stride(2);
  p.B = B; p.Hq = Hq; p.Hkv = Hkv; p.group = Hq / Hkv; p.Tq = Tq; p.Tkv = Tkv; p.D = D; p.nbq = nbq; p.nbk = nbk;
  p.sink_blocks = ceil_div((int)sink_tokens, hydra::kPrefillBlock);
  p.local_back = (int)(recent_tokens / hydra::kPrefillBlock);
  p.window = (int)window;
  p.scale_log2 = (float)(scale * 1.4426950408889634);

  at::Tensor summaries, blocks;
  if (select) {
    summaries = at::empty({B, Hkv, nbk, 2, D}, q.options());
    hydra::SummaryParams sp{};
    sp.dtype = p.dtype;
    sp.k = p.k;
    sp.k_batch_stride = p.k_batch_stride; sp.k_head_stride = p.k_head_stride; sp.k_row_stride = p.k_row_stride;
    sp.out = reinterpret_cast<bf16_t*>(summaries.data_ptr());
    sp.o_batch_stride = summaries.stride(0); sp.o_head_stride = summaries.stride(1);
    sp.o_page_stride = summaries.stride(2);
    sp.B = B; sp.Hkv = Hkv; sp.Tkv = Tkv; sp.D = D; sp.n_pages = nbk; sp.page_size = hydra::kPrefillBlock;
    hydra::launch_page_summaries(sp, stream);
    if (blocks_out != nullptr) {
      blocks = *blocks_out;
    } else {
      blocks = at::empty({B, Hkv, nbq, n_list}, q.options().dtype(at::kInt));
    }
    p.summaries = bf16_ptr(summaries);
    p.s_batch_stride = summaries.stride(0); p.s_head_stride = summaries.stride(1);
    p.s_page_stride = summaries.stride(2);
    p.blocks = blocks.data_ptr<int>();
    p.n_list = n_list;
    hydra::launch_prefill_select(p, stream);
  }
  if (out == nullptr) return;
  p.out = reinterpret_cast<bf16_t*>(out->data_ptr());
  p.o_batch_stride = out->stride(0); p.o_head_stride = out->stride(1); p.o_row_stride = out->stride(2);
  p.lse = lse->data_ptr<float>();
  hydra::launch_prefill_attention(p, stream);
}

}  // namespace

void prefill(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t sink_tokens,
             int64_t recent_tokens, int64_t budget_tokens, int64_t window, double scale, at::Tensor& out,
             at::Tensor& lse) {
  prefill_impl(q, k, v, sink_tokens, recent_tokens, budget_tokens, window, scale, &out, &lse, nullptr);
}

void prefill_blocks(const at::Tensor& q, const at::Tensor& k, int64_t sink_tokens, int64_t recent_tokens,
                    int64_t budget_tokens, at::Tensor& blocks) {
  const int64_t nbq = (q.size(2) + hydra::kPrefillBlock - 1) / hydra::kPrefillBlock;
  const int64_t n_list = budget_tokens / hydra::kPrefillBlock;
  HYDRA_CHECK(blocks.is_cuda() && blocks.scalar_type() == at::kInt && blocks.is_contiguous() && blocks.dim() == 4 &&
                  blocks.size(0) == q.size(0) && blocks.size(1) == k.size(1) && blocks.size(2) == nbq &&
                  blocks.size(3) == n_list,
              "hydra: blocks must be a contiguous int32 CUDA tensor (B, Hkv, ", nbq, ", ", n_list, "), got ",
              blocks.scalar_type(), " ", blocks.sizes());
  HYDRA_CHECK(k.size(2) > budget_tokens, "hydra: prefill_blocks selects only when Tkv > budget_tokens");
  prefill_impl(q, k, k, sink_tokens, recent_tokens, budget_tokens, 0, 1.0, nullptr, nullptr, &blocks);
}
