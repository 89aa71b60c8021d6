/* The BPF target has no asm/ directory of its own: use the generic one. */
#include <asm-generic/posix_types.h>
