/* tests/test_ipadapter.c — placeholder until the ipadapter tests land. */
#include "test.h"
void test_ipadapter(void) {}
