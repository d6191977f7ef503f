// The emulator's stand-in for CUDA's header (see cuda_shim.h).
#include "cuda_shim.h"
