// Which instruction set's kernels run: the best this CPU has, picked once at load, or the one set_isa chooses
// (MTPX_CPU_ISA, read by kernels/__init__.py; tests). Every kernel of kernel_decls.h is built once per instruction
// set (isa_*.cpp, each in its own namespace), and the global function of that name calls the selected one. Also the
// two kernels with nothing instruction-set specific (penalize_rows, flush_denormals).
#include "isa_prelude.h"

#if MTPX_X86
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if MTPX_ARM && MTPX_HAVE_VNNI
#include <asm/hwcap.h>
#include <sys/auxv.h>
#endif

namespace mtpx_scalar {
#include "kernel_decls.h"
}
#if MTPX_X86
namespace mtpx_avx2 {
#include "kernel_decls.h"
}
namespace mtpx_avx512 {
#include "kernel_decls.h"
#if MTPX_HAVE_AMX
torch::Tensor rowgemm_tiles(const torch::Tensor& x, const torch::Tensor& tiles, int64_t n);
#endif
}
#endif
#if MTPX_ARM
namespace mtpx_neon {
#include "kernel_decls.h"
}
#endif

namespace {

enum class Isa { kScalar, kAvx2, kAvx512, kAmx, kNeon };
const char* const kNames[] = {"scalar", "avx2", "avx512", "amx", "neon"};

#if MTPX_X86
// AMX_BF16 and AMX_TILE (CPUID 7.0 EDX bits 22, 24), AVX512_BF16 (7.1 EAX bit 5), and Linux granting the process
// the tile state, which it does only on request (arch_prctl ARCH_REQ_XCOMP_PERM, XTILEDATA)
bool amx_usable() {
#if MTPX_HAVE_AMX
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 22)) || !(d & (1u << 24))) return false;
  if (!__get_cpuid_count(7, 1, &a, &b, &c, &d) || !(a & (1u << 5))) return false;
  constexpr long kReqXcompPerm = 0x1023, kXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0;
#else
  return false;
#endif
}
#endif

// best first; scalar always
const std::vector<Isa>& supported() {
  static const std::vector<Isa> levels = [] {
    std::vector<Isa> l;
#if MTPX_X86
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                        __builtin_cpu_supports("avx512cd");
    if (avx512 && amx_usable()) l.push_back(Isa::kAmx);
    if (avx512) l.push_back(Isa::kAvx512);
    if (avx2) l.push_back(Isa::kAvx2);
#endif
#if MTPX_ARM
    l.push_back(Isa::kNeon);
#endif
    l.push_back(Isa::kScalar);
    return l;
  }();
  return levels;
}

bool amx_switched_off() {
  const char* off = std::getenv("MTPX_AMX");
  return off != nullptr && std::strcmp(off, "0") == 0;
}

Isa initial() {
  for (Isa i : supported())
    if (!(i == Isa::kAmx && amx_switched_off())) return i;
  return Isa::kScalar;
}

std::atomic<Isa> current{initial()};

}  // namespace

std::vector<std::string> cpu_isas() {
  std::vector<std::string> names;
  for (Isa i : supported()) names.emplace_back(kNames[static_cast<int>(i)]);
  return names;
}

std::string isa() { return kNames[static_cast<int>(current.load())]; }

void set_isa(const std::string& name) {
  for (Isa i : supported())
    if (name == kNames[static_cast<int>(i)]) return current.store(i);
  std::string have;
  for (const auto& n : cpu_isas()) have += (have.empty() ? "" : ", ") + n;
  TORCH_CHECK(false, "mtpx: instruction set '", name, "' is not available here; this CPU runs: ", have);
}

bool amx_available() { return current.load() == Isa::kAmx && !amx_switched_off(); }

namespace {
// AVX-VNNI (CPUID 7.1 EAX bit 4) for the AVX2 level, AVX512_VNNI for AVX-512 and AMX, the dot-product extension
// (SDOT) for NEON
bool cpu_vnni(Isa level) {
#if MTPX_X86 && MTPX_HAVE_VNNI
  if (level == Isa::kAvx2) {
    unsigned a, b, c, d;
    return __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a & (1u << 4));
  }
  return (level == Isa::kAvx512 || level == Isa::kAmx) && __builtin_cpu_supports("avx512vnni");
#elif MTPX_ARM && MTPX_HAVE_VNNI
  return level == Isa::kNeon && (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#else
  (void)level;
  return false;
#endif
}

std::atomic<bool> vnni_on{[] {
  const char* v = std::getenv("MTPX_VNNI");
  return v == nullptr || std::strcmp(v, "0") != 0;
}()};
}  // namespace

bool int_dot_vnni() {
  const Isa level = current.load(std::memory_order_relaxed);
#if MTPX_ARM && defined(__ARM_FEATURE_DOTPROD)
  if (level == Isa::kNeon) return true;  // the compiler's baseline: the NEON build has no loops without it
#endif
  if (!vnni_on.load(std::memory_order_relaxed)) return false;
  static const bool avx2 = cpu_vnni(Isa::kAvx2), avx512 = cpu_vnni(Isa::kAvx512), neon = cpu_vnni(Isa::kNeon);
  switch (level) {
    case Isa::kAvx2: return avx2;
    case Isa::kAvx512:
    case Isa::kAmx: return avx512;
    case Isa::kNeon: return neon;
    default: return false;
  }
}

void set_int_dot_vnni(bool on) { vnni_on.store(on); }

torch::Tensor rowgemm_tiles(const torch::Tensor& x, const torch::Tensor& tiles, int64_t n) {
#if MTPX_HAVE_AMX
  return mtpx_avx512::rowgemm_tiles(x, tiles, n);  // checks the shapes, then amx_available()
#else
  TORCH_CHECK(false, "rowgemm_tiles: this build has no AMX");
#endif
}

#if MTPX_X86
#define MTPX_DISPATCH(f, ...)                                                    \
  switch (current.load(std::memory_order_relaxed)) {                             \
    case Isa::kAmx:                                                              \
    case Isa::kAvx512: return mtpx_avx512::f(__VA_ARGS__);                       \
    case Isa::kAvx2: return mtpx_avx2::f(__VA_ARGS__);                           \
    default: return mtpx_scalar::f(__VA_ARGS__);                                 \
  }
#elif MTPX_ARM
#define MTPX_DISPATCH(f, ...)                                                    \
  if (current.load(std::memory_order_relaxed) == Isa::kNeon) return mtpx_neon::f(__VA_ARGS__); \
  return mtpx_scalar::f(__VA_ARGS__);
#else
#define MTPX_DISPATCH(f, ...) return mtpx_scalar::f(__VA_ARGS__);
#endif

torch::Tensor rowgemm(const torch::Tensor& x, const torch::Tensor& w) { MTPX_DISPATCH(rowgemm, x, w) }
torch::Tensor rowgemm_int8(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale) {
  MTPX_DISPATCH(rowgemm_int8, x, q, scale)
}
torch::Tensor rowgemm_int4(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& groups,
                           const torch::Tensor& supers) {
  MTPX_DISPATCH(rowgemm_int4, x, codes, groups, supers)
}
torch::Tensor rowgemm_int8_blocks(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& groups,
                                  const torch::Tensor& supers) {
  MTPX_DISPATCH(rowgemm_int8_blocks, x, codes, groups, supers)
}
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps, bool offset) {
  MTPX_DISPATCH(rms_norm, x, weight, eps, offset)
}
torch::Tensor silu_mul(const torch::Tensor& gate_up) { MTPX_DISPATCH(silu_mul, gate_up) }
torch::Tensor attention_step(const torch::Tensor& qkv, const torch::Tensor& q_norm, const torch::Tensor& k_norm,
                             const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor cache_k,
                             torch::Tensor cache_v, int64_t start, int64_t nh, int64_t nkv, int64_t D, double eps) {
  MTPX_DISPATCH(attention_step, qkv, q_norm, k_norm, cos, sin, cache_k, cache_v, start, nh, nkv, D, eps)
}
std::vector<torch::Tensor> gdn_step(const torch::Tensor& proj, const torch::Tensor& conv_state,
                                    const torch::Tensor& conv_weight, const torch::Tensor& A_log,
                                    const torch::Tensor& dt_bias, const torch::Tensor& norm_weight,
                                    const torch::Tensor& state, int64_t nk, int64_t dk, int64_t dv, double eps) {
  MTPX_DISPATCH(gdn_step, proj, conv_state, conv_weight, A_log, dt_bias, norm_weight, state, nk, dk, dv, eps)
}
torch::Tensor gdn_replay(const torch::Tensor& state, const torch::Tensor& replay, int64_t n) {
  MTPX_DISPATCH(gdn_replay, state, replay, n)
}
std::vector<int64_t> argmax_rows(const torch::Tensor& x) { MTPX_DISPATCH(argmax_rows, x) }

// sampling.apply_penalties for the rows of a verify pass in one pass over the logits [R, V]: row j is penalised for
// the history (counts [V]: how often each id was generated; seen [V]: in the prompt or generated) plus drafts[:j],
// with sampling.penalize's formula in its operation order, v -> (seen ? (v > 0 ? v / r : v * r) : v) - f * c -
// p * (c > 0), so both give the same bits. (In PyTorch ops it is ~15 small ops a round.) Returns fp32 [R, V]; the inputs stay as they were.
torch::Tensor penalize_rows(const torch::Tensor& logits, const torch::Tensor& counts, const torch::Tensor& seen,
                            const torch::Tensor& drafts, double repetition, double frequency, double presence) {
  TORCH_CHECK(logits.dim() == 2 && logits.device().is_cpu(), "penalize_rows: logits must be a CPU tensor [R, V]");
  const int64_t R = logits.size(0), V = logits.size(1);
  TORCH_CHECK(counts.scalar_type() == at::kFloat && counts.is_contiguous() && counts.numel() == V,
              "penalize_rows: counts must be contiguous fp32 [V]");
  TORCH_CHECK(seen.scalar_type() == at::kBool && seen.is_contiguous() && seen.numel() == V,
              "penalize_rows: seen must be contiguous bool [V]");
  TORCH_CHECK(drafts.scalar_type() == at::kLong && drafts.is_contiguous() && drafts.numel() >= R - 1,
              "penalize_rows: drafts must be contiguous int64 with at least R - 1 ids");
  auto out = logits.to(at::kFloat).contiguous().clone();
  float* op = out.data_ptr<float>();
  const float* cp = counts.data_ptr<float>();
  const bool* sp = seen.data_ptr<bool>();
  const int64_t* dp = drafts.data_ptr<int64_t>();
  const float r = static_cast<float>(repetition), f = static_cast<float>(frequency), p = static_cast<float>(presence);
  for (int64_t i = 0; i + 1 < R; ++i)
    TORCH_CHECK(dp[i] >= 0 && dp[i] < V, "penalize_rows: draft id ", dp[i], " out of range");
  for (int64_t j = 0; j < R; ++j) {
    float* row = op + j * V;
    std::vector<std::pair<int64_t, float>> drafted;  // the ids of drafts[:j], with their logits before any penalty
    for (int64_t i = 0; i < j; ++i) {
      bool known = false;
      for (const auto& d : drafted) known = known || d.first == dp[i];
      if (!known) drafted.emplace_back(dp[i], row[dp[i]]);
    }
    for (int64_t id = 0; id < V; ++id)
      if (sp[id]) row[id] = penalized_logit(row[id], cp[id], true, r, f, p);
    for (const auto& [id, v] : drafted) {  // seen now, and counted once more per occurrence in drafts[:j]
      float extra = 0.0f;
      for (int64_t i = 0; i < j; ++i) extra += dp[i] == id ? 1.0f : 0.0f;
      row[id] = penalized_logit(v, cp[id] + extra, true, r, f, p);
    }
  }
  return out;
}

// Flush-to-zero and denormals-are-zero live in each thread's MXCSR, and torch.set_flush_denormal sets only the
// calling thread's: intra-op workers started before it keep computing on subnormals, many times slower.
// at::parallel_for over one element per intra-op thread with grain 1 gives each thread of the team
// one task, which sets them there; returns the number of tasks run.
int64_t flush_denormals() {
  const int64_t n = at::get_num_threads();
  std::atomic<int64_t> done{0};
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
#if defined(__x86_64__)
    _mm_setcsr(_mm_getcsr() | 0x8040);
#endif
    done += end - begin;
  });
  return done.load();
}
