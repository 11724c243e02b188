/*
 * kwork: a workload process for kscope's Linux memory images.
 *
 *   kwork gen FILE MIB SEED     write a deterministic pseudo-random file (host or guest)
 *   kwork text FILE MIB         write a deterministic text file (compressible)
 *   kwork run HEAP_MIB FILE SEED
 *       allocate HEAP_MIB of heap and fill it: a quarter copied from FILE (content that is
 *       also in the page cache), a quarter pseudo-random from SEED, a quarter a pattern shared
 *       by every kwork, a quarter left untouched; map FILE shared and read every page
 *       (mapped page cache), map it private and write every eighth page (copy-on-write
 *       anonymous pages), grow the stack by 256 KiB; then print "kwork ready" and pause.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static uint64_t xs(uint64_t *s) {
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static int gen(const char *path, long mib, uint64_t seed, int text) {
    FILE *f = fopen(path, "w");
    if (!f) {
        perror(path);
        return 1;
    }
    uint64_t s = seed * 0x9e3779b97f4a7c15ull + 1;
    static const char *words[] = {"kscope", "clone", "page", "cache", "frame", "color",
                                  "kernel", "anon", "slab", "buddy", "table", "zero"};
    for (long i = 0; i < (text ? mib << 20 : mib * 1024 * 128); i++) {
        if (text) {
            fputs(words[xs(&s) % 12], f);
            fputc(i % 9 == 8 ? '\n' : ' ', f);
            if (ftell(f) >= mib << 20)
                break;
        } else {
            uint64_t v = xs(&s);
            fwrite(&v, 8, 1, f);
        }
    }
    return fclose(f) != 0;
}

static volatile uint8_t sink;

static void deep(int n) {
    volatile uint8_t frame[4096];
    for (int i = 0; i < 4096; i += 512)
        frame[i] = (uint8_t)(n + i);
    if (n > 0)
        deep(n - 1);
    sink = frame[0];
}

int main(int argc, char **argv) {
    if (argc == 5 && !strcmp(argv[1], "gen"))
        return gen(argv[2], atol(argv[3]), strtoull(argv[4], 0, 10), 0);
    if (argc == 4 && !strcmp(argv[1], "text"))
        return gen(argv[2], atol(argv[3]), 7, 1);
    if (argc != 5 || strcmp(argv[1], "run")) {
        fprintf(stderr, "usage: kwork gen FILE MIB SEED | text FILE MIB | run HEAP_MIB FILE SEED\n");
        return 2;
    }
    size_t heap = (size_t)atol(argv[2]) << 20;
    uint64_t s = strtoull(argv[4], 0, 10) + 1;
    int fd = open(argv[3], O_RDONLY);
    if (fd < 0) {
        perror(argv[3]);
        return 1;
    }
    struct stat st;
    fstat(fd, &st);
    size_t flen = (size_t)st.st_size;
    uint8_t *h = malloc(heap);
    if (!h)
        return 1;
    size_t q = heap / 4;
    size_t got = 0;
    while (got < q) {
        ssize_t r = pread(fd, h + got, q - got, (off_t)(got % (flen ? flen : 1)));
        if (r <= 0)
            break;
        got += (size_t)r;
    }
    for (size_t i = q; i + 8 <= 2 * q; i += 8) {
        uint64_t v = xs(&s);
        memcpy(h + i, &v, 8);
    }
    for (size_t i = 2 * q; i < 3 * q; i++)
        h[i] = (uint8_t)(i * 31 >> 7);
    uint8_t *shared = mmap(NULL, flen, PROT_READ, MAP_SHARED, fd, 0);
    uint8_t *priv = mmap(NULL, flen, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    if (shared == MAP_FAILED || priv == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    for (size_t i = 0; i < flen; i += 4096)
        sink ^= shared[i];
    for (size_t i = 0; i < flen; i += 8 * 4096)
        priv[i] ^= 0x5a;
    deep(64);
    printf("kwork ready: heap %zu MiB, file %s (%zu KiB)\n", heap >> 20, argv[3], flen >> 10);
    fflush(stdout);
    for (;;)
        pause();
}
