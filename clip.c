/* clip.c — placeholder: being written. */
#include "sdref.h"
typedef int clip_placeholder;
int cmd_clip_text(int argc, char **argv) { (void)argc; (void)argv; sd_error("not implemented yet"); return 1; }
int cmd_clip_vision(int argc, char **argv) { (void)argc; (void)argv; sd_error("not implemented yet"); return 1; }
int cmd_preprocess(int argc, char **argv) { (void)argc; (void)argv; sd_error("not implemented yet"); return 1; }
