/* tests/test_cli.c — placeholder until the cli tests land. */
#include "test.h"
void test_cli(void) {}
