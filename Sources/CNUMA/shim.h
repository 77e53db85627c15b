#ifndef MEMLAB_CNUMA_SHIM_H
#define MEMLAB_CNUMA_SHIM_H
#include <numa.h>
#endif
