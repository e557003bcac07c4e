# sdref — Stable Diffusion reference inference in portable C99.
#   make            build ./sdref (OpenMP when the compiler has it: make OPENMP= to build without)
#   make test       build and run the test suite (last line: "N passed, M failed")
#   make exhaustive run the exhaustive number-format checks (all 2^32 inputs; minutes)
#   make demo       run the built-in demo (no files needed)
#   make fuzz       build the libFuzzer targets (clang)
#   make bench      measure speed and memory
CC      ?= cc
CFLAGS  ?= -O3
OPENMP  ?= -fopenmp
STD      = -std=c99 -Wall -Wextra -Wpedantic -Werror -ffp-contract=off
LDLIBS   = -lm

SRC  = fp16.c ref.c io.c cli.c png.c tokenizer.c clip.c unet.c vae.c ipadapter.c sampler.c pipeline.c lab.c demo.c report.c
HDR  = sdref.h unicode_tables.h
TESTS = $(wildcard tests/test_*.c)

all: sdref

sdref: $(SRC) main.c $(HDR)
	$(CC) $(CFLAGS) $(STD) $(OPENMP) $(SRC) main.c -o $@ $(LDLIBS)

tests/run: $(SRC) $(HDR) tests/run.c tests/test.h $(TESTS)
	$(CC) $(CFLAGS) $(STD) $(OPENMP) -I. $(SRC) tests/run.c $(TESTS) -o $@ $(LDLIBS)

test: sdref tests/run
	./tests/run

exhaustive: tests/run
	SDREF_EXHAUSTIVE=1 ./tests/run fp16 math

demo: sdref
	./sdref demo

test-full: sdref tests/run
	SDREF_FULL=1 ./tests/run

FUZZ_TARGETS = fuzz/fuzz_safetensors fuzz/fuzz_npy fuzz/fuzz_json fuzz/fuzz_png fuzz/fuzz_inflate
fuzz: $(FUZZ_TARGETS)
fuzz/fuzz_%: fuzz/fuzz_%.c $(SRC) $(HDR)
	clang -g -O1 -std=c99 -ffp-contract=off -fsanitize=fuzzer,address,undefined -I. $(SRC) $< -o $@ -lm

bench: sdref tests/bench.sh tests/bench.c
	sh tests/bench.sh

clean:
	rm -f sdref tests/run $(FUZZ_TARGETS)

.PHONY: all test test-full exhaustive demo fuzz bench clean
