// GPU-less occupancy check of the persistent recurrence kernels (run by the build after _cuda).
//
// Reads the register counts ptxas gave every kernel (the -v logs kept next to the objects by
// tools/save_ptxas_log.sh), and for an A100 (sm_80 cubin) and an H100 (sm_90 cubin) plans every
// supported size with the same planner the launcher uses (recurrence_plan.h), with occupancy from
// the toolkit's cuda_occupancy.h instead of the driver. It fails if a kernel cannot be resident at
// all or a plan does not fit, and prints which sizes keep their weights in shared memory.
//
// usage: fusedrnn_occupancy_check <object or .ptxas.log>...
#include <cuda_occupancy.h>

#include <climits>
#include <cstdio>
#include <fstream>
#include <map>
#include <regex>
#include <string>
#include <vector>

#include "recurrence_plan.h"

namespace {

using fusedrnn::CellKind;
using namespace fusedrnn::cuda;

struct Device {
  const char* name;
  const char* arch;  // the cubin it runs
  cudaOccDeviceProp prop;
};

Device make_device(const char* name, const char* arch, int major, int sms, size_t smem_per_sm,
                   size_t optin) {
  Device d{name, arch, {}};
  d.prop.computeMajor = major;
  d.prop.computeMinor = 0;
  d.prop.maxThreadsPerBlock = 1024;
  d.prop.maxThreadsPerMultiprocessor = 2048;
  d.prop.regsPerBlock = 65536;
  d.prop.regsPerMultiprocessor = 65536;
  d.prop.warpSize = 32;
  d.prop.sharedMemPerBlock = 48 * 1024;
  d.prop.sharedMemPerMultiprocessor = smem_per_sm;
  d.prop.numSms = sms;
  d.prop.sharedMemPerBlockOptin = optin;
  d.prop.reservedSharedMemPerBlock = 1024;
  return d;
}

// Kernel key: "<fwd|bwd>/<cell>/<dtype>/<smem|stream>" -> arch -> registers.
using Registers = std::map<std::string, std::map<std::string, int>>;

std::string kernel_key(const std::string& mangled) {
  const bool fwd = mangled.find("recurrence_forward_kernel") != std::string::npos;
  const bool bwd = mangled.find("recurrence_backward_kernel") != std::string::npos;
  if (!fwd && !bwd) return "";
  std::string cell = mangled.find("LstmTraits") != std::string::npos   ? "lstm"
                     : mangled.find("CifgTraits") != std::string::npos ? "lstm_cifg"
                     : mangled.find("GruTraits") != std::string::npos  ? "gru"
                                                                        : "rnn";
  // Template args after the traits: f (float), d (double), 6__half, 13__nv_bfloat16; then Lb1E/Lb0E.
  std::smatch m;
  static const std::regex args_re("Traits(EfL|EdL|E6__halfL|E13__nv_bfloat16L)b([01])E");
  if (!std::regex_search(mangled, m, args_re)) return "";
  const std::string t = m[1];
  const std::string dtype = t == "EfL" ? "float32" : t == "EdL" ? "float64"
                            : t == "E6__halfL" ? "float16" : "bfloat16";
  return std::string(fwd ? "fwd" : "bwd") + "/" + cell + "/" + dtype + "/" +
         (m[2] == "1" ? "smem" : "stream");
}

bool read_logs(const std::vector<std::string>& paths, Registers& regs) {
  static const std::regex entry_re("Compiling entry function '([^']+)' for '(sm_[0-9]+[a-z]?)'");
  static const std::regex used_re("Used ([0-9]+) registers");
  bool any = false;
  for (std::string path : paths) {
    // An object's log sits next to it; a path may also name a log directly.
    std::ifstream in(path + ".ptxas.log");
    if (!in) in.open(path);
    if (!in) continue;
    std::string line, key, arch;
    while (std::getline(in, line)) {
      std::smatch m;
      if (std::regex_search(line, m, entry_re)) {
        key = kernel_key(m[1]);
        arch = m[2];
      } else if (!key.empty() && std::regex_search(line, m, used_re)) {
        regs[key][arch] = std::stoi(m[1]);
        any = true;
        key.clear();
      }
    }
  }
  return any;
}

int blocks_per_sm(const Device& dev, int registers, int64_t smem) {
  cudaOccFuncAttributes attr;
  attr.maxThreadsPerBlock = kThreadsPerBlock;
  attr.numRegs = registers;
  attr.sharedSizeBytes = 0;
  attr.partitionedGCConfig = PARTITIONED_GC_OFF;
  attr.shmemLimitConfig = FUNC_SHMEM_LIMIT_OPTIN;
  attr.maxDynamicSharedSizeBytes = dev.prop.sharedMemPerBlockOptin;
  attr.numBlockBarriers = 1;
  cudaOccDeviceState state;
  cudaOccResult result{};
  if (cudaOccMaxActiveBlocksPerMultiprocessor(&result, &dev.prop, &attr, &state, kThreadsPerBlock,
                                              static_cast<size_t>(smem)) != CUDA_OCC_SUCCESS) {
    return 0;
  }
  return result.activeBlocksPerMultiprocessor;
}

struct DtypeInfo {
  const char* name;
  int64_t elem;
  int64_t acc;
};

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> paths(argv + 1, argv + argc);
  Registers regs;
  if (!read_logs(paths, regs)) {
    std::fprintf(stderr, "occupancy check: no ptxas -v register counts found in the given logs\n");
    return 1;
  }
  const Device devices[] = {
      make_device("A100", "sm_80", 8, 108, 167936, 166912),
      make_device("H100", "sm_90", 9, 132, 233472, 232448),
  };
  const DtypeInfo dtypes[] = {{"float32", 4, 4}, {"float64", 8, 8}, {"float16", 2, 4},
                              {"bfloat16", 2, 4}};
  const struct { CellKind kind; const char* name; } cells[] = {
      {CellKind::kLstm, "lstm"}, {CellKind::kLstmCifg, "lstm_cifg"}, {CellKind::kGru, "gru"},
      {CellKind::kRnnTanh, "rnn"}};
  const int64_t hiddens[] = {1, 37, 128, 256, 512, 768, 1024, 2048, 4096};
  const int64_t batches[] = {1, 16, 64, 256};

  int failures = 0;
  for (const Device& dev : devices) {
    bool arch_built = false;
    for (const auto& [key, by_arch] : regs) arch_built |= by_arch.count(dev.arch) > 0;
    if (!arch_built) {
      std::printf("occupancy check: %s skipped (no %s cubin in this build)\n", dev.name, dev.arch);
      continue;
    }
    int max_regs = 0;
    int planned = 0, in_smem = 0, staged = 0, k_staged = 0, tagged = 0;
    std::string largest_smem_lstm;
    for (const auto& dt : dtypes) {
      for (const auto& cell : cells) {
        for (const bool backward : {false, true}) {
          const std::string base = std::string(backward ? "bwd" : "fwd") + "/" + cell.name + "/" + dt.name;
          const auto smem_it = regs.find(base + "/smem");
          const auto stream_it = regs.find(base + "/stream");
          if (smem_it == regs.end() || stream_it == regs.end() ||
              !smem_it->second.count(dev.arch) || !stream_it->second.count(dev.arch)) {
            std::printf("occupancy check: FAIL %s: no register count for %s on %s\n", dev.name,
                        base.c_str(), dev.arch);
            ++failures;
            continue;
          }
          const int r_smem = smem_it->second.at(dev.arch);
          const int r_stream = stream_it->second.at(dev.arch);
          max_regs = std::max({max_regs, r_smem, r_stream});
          for (const int64_t hidden : hiddens) {
            for (const bool proj : {false, true}) {
              if (proj && (!has_cell_state(cell.kind) || hidden < 2)) continue;
              for (const int64_t batch : batches) {
                for (const int dirs : {1, 2}) {
                  // The tagged exchange (opt-in) changes units per block (16-bit: even) and
                  // adds a staging slice of h: its plans must fit too.
                  for (const bool tag : {false, true}) {
                    if (tag && (backward || proj || dt.elem > 4)) continue;
                    PlanInput in;
                    in.tagged_exchange = tag;
                    in.backward = backward;
                    in.cell = cell.kind;
                    in.batch = batch;
                    in.hidden = hidden;
                    in.state = proj ? hidden / 2 : hidden;
                    in.num_dirs = dirs;
                    in.elem_bytes = dt.elem;
                    in.acc_bytes = dt.acc;
                    in.sm_count = dev.prop.numSms;
                    in.max_smem_per_block = static_cast<int64_t>(dev.prop.sharedMemPerBlockOptin);
                    in.stageable = weight_rows_are_vectors(in.state, hidden, proj, dt.elem);
                    try {
                      const auto per_sm_of = [&](bool smem, int64_t bytes) {
                        return blocks_per_sm(dev, smem ? r_smem : r_stream, bytes);
                      };
                      const RecurrenceGeometry g = plan_recurrence(in, per_sm_of);
                      const int per_sm =
                          blocks_per_sm(dev, g.weights_in_smem ? r_smem : r_stream, g.smem_bytes);
                      if (static_cast<int64_t>(per_sm) * dev.prop.numSms <
                          static_cast<int64_t>(g.blocks_per_dir) * dirs) {
                        throw std::runtime_error("grid of " +
                                                 std::to_string(g.blocks_per_dir * dirs) +
                                                 " blocks is not co-resident");
                      }
                      ++planned;
                      if (g.stage_rows[0] > 0) ++(backward ? k_staged : staged);
                      if (g.tagged_exchange) ++tagged;
                      if (g.weights_in_smem) {
                        ++in_smem;
                        if (cell.kind == CellKind::kLstm && !proj && batch == 16 && dirs == 1 &&
                            !backward && !tag && std::string(dt.name) == "bfloat16") {
                          largest_smem_lstm = "H=" + std::to_string(hidden);
                        }
                      }
                    } catch (const std::exception& e) {
                      std::printf("occupancy check: FAIL %s %s%s H=%lld P=%lld B=%lld "
                                  "dirs=%d: %s\n",
                                  dev.name, base.c_str(), tag ? " (tagged)" : "",
                                  static_cast<long long>(hidden), static_cast<long long>(in.state),
                                  static_cast<long long>(batch), dirs, e.what());
                      ++failures;
                    }
                  }
                }
              }
            }
          }
        }
      }
    }
    std::printf("occupancy check: %s (%s, %d SMs, %zu B smem/block): %d plans fit, %d keep W_hh in "
                "shared memory, %d stage it (forward), %d stage K ranges of it (backward), %d exchange "
                "tagged words; max %d registers/thread; "
                "bf16 LSTM B=16 forward keeps weights on chip up to %s\n",
                dev.name, dev.arch, dev.prop.numSms, dev.prop.sharedMemPerBlockOptin, planned,
                in_smem, staged, k_staged, tagged, max_regs,
                largest_smem_lstm.empty() ? "none" : largest_smem_lstm.c_str());
  }
  if (failures > 0) {
    std::fprintf(stderr, "occupancy check: %d failures\n", failures);
    return 1;
  }
  return 0;
}
