/* tokenizer.c — placeholder: being written. */
#include "sdref.h"
typedef int tokenizer_placeholder;
int cmd_tokenize(int argc, char **argv) { (void)argc; (void)argv; sd_error("not implemented yet"); return 1; }
