/* tests/test_tokenizer.c — placeholder until the tokenizer tests land. */
#include "test.h"
void test_tokenizer(void) {}
