#ifndef MEMLAB_CZSTD_SHIM_H
#define MEMLAB_CZSTD_SHIM_H
#include <zstd.h>
#endif
