// What every loraplex AMX kernel shares (Intel CPUs with AMX-BF16; compiled only where the
// compiler targets AMX): the tile config, a compiler barrier the tile intrinsics need, and the
// OS permission for the tile state.
#pragma once

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

namespace loraplex_amx {

// Palette 1: up to 8 tiles of up to 16 rows x 64 bytes; rows[t], colsb[t] shape tile t.
struct alignas(64) Config {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  void set(int t, int64_t r, int64_t cb) {
    rows[t] = static_cast<uint8_t>(r);
    colsb[t] = static_cast<uint16_t>(cb);
  }
};

// GCC's tile intrinsics are asm statements that do not declare the memory they read (the
// config, the rows a tile load reads); ordinary stores into those buffers just before must not
// be moved past them, which this compiler barrier guarantees (volatile asm alone does in
// practice, not by contract; without it GCC dropped a config's stores before ldtilecfg, which
// then faulted).
inline void fence() { asm volatile("" ::: "memory"); }

// Linux hands a process AMX's tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA); without it the first tile instruction kills the process. Asked once;
// oneDNN asks for the same thing, so ours is usually already granted.
inline bool permitted() {
  constexpr int kArchReqXcompPerm = 0x1023;  // ARCH_REQ_XCOMP_PERM
  constexpr int kXfeatureXtiledata = 18;      // XFEATURE_XTILEDATA
  static const bool ok = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  return ok;
}

}  // namespace loraplex_amx
#endif
