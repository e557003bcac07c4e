/* unet.c — placeholder: being written. */
#include "sdref.h"
typedef int unet_placeholder;
int cmd_unet(int argc, char **argv) { (void)argc; (void)argv; sd_error("not implemented yet"); return 1; }
