/*
 * ktruth: ground truth for kscope's Linux colorer, read inside the guest at one moment.
 *
 * Usage: ktruth OUTPUT_DEVICE ROOT...
 *
 * Collects, in this order (the cheap-to-change facts last):
 *   - every regular file under ROOT (not /proc, /sys, /dev): its resident page-cache pages
 *     (mincore) and their frames (mapped read-only for an instant, /proc/self/pagemap),
 *     with the file's kind (executable if any x bit is set, else data);
 *   - every process: /proc/PID/maps and /proc/PID/pagemap (frame, VMA perms, file-backed);
 *   - /proc/iomem: the physical ranges of the kernel image (code, rodata, data, bss);
 *   - /proc/kpageflags: the kernel's flags of every frame.
 * All output lives in one buffer that is allocated and touched before collecting, then
 * written with O_DIRECT to OUTPUT_DEVICE (no page cache), and the program prints
 * KSCOPE-TRUTH-READY on stdout and pauses, so its own memory stays as it was read while the
 * host dumps guest memory.
 *
 * Format (little endian), version 1:
 *   header: magic "KSCTRUTH", u32 version, u32 crc32(payload), u64 payload_len, u64 0
 *   payload: sections { u32 tag, u32 0, u64 count, records }:
 *     1 KPAGEFLAGS count x u64 (index = frame number)
 *     2 IOMEM      count x { u64 start, u64 end_inclusive, u32 kind (1 code, 2 rodata,
 *                           3 data, 4 bss), u32 0 }
 *     3 USER       count x { u64 pfn, u32 pid, u32 flags (1 exec, 2 file, 4 write) }
 *     4 CACHE      count x { u64 pfn, u32 kind (1 exec, 2 data), u32 file_index }
 *     5 VMSTAT     count x u64: nr_free_pages (frames in free buddy blocks)
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define BUF_BYTES (8u << 20)
#define PAGE 4096u

static uint8_t *buf;
static size_t len;
static uint32_t file_index;

static void die(const char *what) {
    fprintf(stderr, "ktruth: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void put(const void *p, size_t n) {
    if (len + n > BUF_BYTES) {
        errno = ENOSPC;
        die("output buffer full");
    }
    memcpy(buf + len, p, n);
    len += n;
}

static size_t section(uint32_t tag) {
    uint32_t z = 0;
    uint64_t count = 0;
    put(&tag, 4);
    put(&z, 4);
    size_t at = len;
    put(&count, 8);
    return at;
}

static void set_count(size_t at, uint64_t count) { memcpy(buf + at, &count, 8); }

static uint64_t n_cache;

static void cache_of(const char *path, const struct stat *st) {
    if (st->st_size == 0)
        return;
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return;
    size_t pages = ((size_t)st->st_size + PAGE - 1) / PAGE;
    uint8_t *map = mmap(NULL, pages * PAGE, PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    if (map == MAP_FAILED)
        return;
    static unsigned char vec[1 << 16];
    static uint64_t pm[1 << 16];
    uint32_t kind = (st->st_mode & 0111) ? 1 : 2;
    int pmfd = open("/proc/self/pagemap", O_RDONLY);
    if (pmfd < 0)
        die("open /proc/self/pagemap");
    for (size_t base = 0; base < pages; base += sizeof vec) {
        size_t n = pages - base < sizeof vec ? pages - base : sizeof vec;
        if (mincore(map + base * PAGE, n * PAGE, vec) != 0)
            die("mincore");
        for (size_t i = 0; i < n; i++)
            if (vec[i] & 1)
                (void)*(volatile uint8_t *)(map + (base + i) * PAGE);
        off_t off = (off_t)((uintptr_t)(map + base * PAGE) / PAGE) * 8;
        if (pread(pmfd, pm, n * 8, off) != (ssize_t)(n * 8))
            die("read /proc/self/pagemap");
        for (size_t i = 0; i < n; i++) {
            if (!(vec[i] & 1) || !(pm[i] >> 63))
                continue;
            uint64_t pfn = pm[i] & ((1ull << 55) - 1);
            put(&pfn, 8);
            put(&kind, 4);
            put(&file_index, 4);
            n_cache++;
        }
    }
    close(pmfd);
    munmap(map, pages * PAGE);
    file_index++;
}

static void walk(const char *dir) {
    DIR *d = opendir(dir);
    if (!d)
        return;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
            continue;
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", strcmp(dir, "/") ? dir : "", e->d_name);
        if (!strcmp(path, "/proc") || !strcmp(path, "/sys") || !strcmp(path, "/dev"))
            continue;
        struct stat st;
        if (lstat(path, &st) != 0)
            continue;
        if (S_ISDIR(st.st_mode))
            walk(path);
        else if (S_ISREG(st.st_mode))
            cache_of(path, &st);
    }
    closedir(d);
}

static uint64_t n_user;

static void process(int pid) {
    char p[64];
    snprintf(p, sizeof p, "/proc/%d/maps", pid);
    FILE *maps = fopen(p, "r");
    if (!maps)
        return;
    snprintf(p, sizeof p, "/proc/%d/pagemap", pid);
    int pmfd = open(p, O_RDONLY);
    if (pmfd < 0) {
        fclose(maps);
        return;
    }
    static uint64_t pm[1 << 14];
    char line[4096];
    while (fgets(line, sizeof line, maps)) {
        unsigned long long start, end, ino;
        char perms[8];
        unsigned int dmaj, dmin;
        unsigned long long off;
        if (sscanf(line, "%llx-%llx %7s %llx %x:%x %llu", &start, &end, perms, &off, &dmaj,
                   &dmin, &ino) != 7)
            continue;
        if (start >= 0x800000000000ull)
            continue; /* [vsyscall] */
        uint32_t flags = (perms[2] == 'x' ? 1 : 0) | (ino ? 2 : 0) | (perms[1] == 'w' ? 4 : 0);
        for (unsigned long long va = start; va < end;) {
            size_t n = (end - va) / PAGE;
            if (n > sizeof pm / 8)
                n = sizeof pm / 8;
            ssize_t got = pread(pmfd, pm, n * 8, (off_t)(va / PAGE) * 8);
            if (got <= 0)
                break;
            n = (size_t)got / 8;
            for (size_t i = 0; i < n; i++) {
                if (!(pm[i] >> 63))
                    continue;
                uint64_t pfn = pm[i] & ((1ull << 55) - 1);
                uint32_t upid = (uint32_t)pid;
                put(&pfn, 8);
                put(&upid, 4);
                put(&flags, 4);
                n_user++;
            }
            va += n * PAGE;
        }
    }
    close(pmfd);
    fclose(maps);
}

static uint32_t crc32(const uint8_t *p, size_t n) {
    uint32_t c = 0xffffffffu;
    for (size_t i = 0; i < n; i++) {
        c ^= p[i];
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (0xedb88320u & (0u - (c & 1)));
    }
    return ~c;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: ktruth OUTPUT_DEVICE ROOT...\n");
        return 2;
    }
    buf = mmap(NULL, BUF_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE,
               -1, 0);
    if (buf == MAP_FAILED)
        die("mmap output buffer");
    memset(buf, 0, BUF_BYTES);
    if (mlock(buf, BUF_BYTES) != 0)
        die("mlock output buffer");
    int out = open(argv[1], O_WRONLY | O_DIRECT);
    if (out < 0)
        die("open output device");
    len = 32; /* header, filled at the end */

    size_t at = section(4);
    for (int i = 2; i < argc; i++)
        walk(argv[i]);
    set_count(at, n_cache);

    at = section(3);
    DIR *d = opendir("/proc");
    if (!d)
        die("open /proc");
    struct dirent *e;
    while ((e = readdir(d)))
        if (isdigit((unsigned char)e->d_name[0]))
            process(atoi(e->d_name));
    closedir(d);
    set_count(at, n_user);

    at = section(2);
    uint64_t n_iomem = 0;
    FILE *io = fopen("/proc/iomem", "r");
    if (!io)
        die("open /proc/iomem");
    char line[512];
    while (fgets(line, sizeof line, io)) {
        unsigned long long s, en;
        char name[256];
        if (sscanf(line, " %llx-%llx : %255[^\n]", &s, &en, name) != 3)
            continue;
        uint32_t kind = !strcmp(name, "Kernel code")     ? 1
                        : !strcmp(name, "Kernel rodata") ? 2
                        : !strcmp(name, "Kernel data")   ? 3
                        : !strcmp(name, "Kernel bss")    ? 4
                                                         : 0;
        if (!kind)
            continue;
        uint64_t r[2] = {s, en};
        uint32_t k2[2] = {kind, 0};
        put(r, 16);
        put(k2, 8);
        n_iomem++;
    }
    fclose(io);
    set_count(at, n_iomem);

    at = section(5);
    FILE *vm = fopen("/proc/vmstat", "r");
    if (!vm)
        die("open /proc/vmstat");
    uint64_t nr_free = 0;
    while (fgets(line, sizeof line, vm))
        if (sscanf(line, "nr_free_pages %llu", (unsigned long long *)&nr_free) == 1)
            break;
    fclose(vm);
    put(&nr_free, 8);
    set_count(at, 1);

    at = section(1);
    int kpf = open("/proc/kpageflags", O_RDONLY);
    if (kpf < 0)
        die("open /proc/kpageflags");
    uint64_t frames = 0;
    for (;;) {
        if (len + 65536 > BUF_BYTES) {
            errno = ENOSPC;
            die("kpageflags does not fit");
        }
        ssize_t got = read(kpf, buf + len, 65536);
        if (got < 0)
            die("read /proc/kpageflags");
        if (got == 0)
            break;
        len += (size_t)got;
        frames += (uint64_t)got / 8;
    }
    close(kpf);
    set_count(at, frames);

    uint64_t payload = len - 32;
    uint32_t version = 1, crc = crc32(buf + 32, payload);
    uint64_t zero = 0;
    memcpy(buf, "KSCTRUTH", 8);
    memcpy(buf + 8, &version, 4);
    memcpy(buf + 12, &crc, 4);
    memcpy(buf + 16, &payload, 8);
    memcpy(buf + 24, &zero, 8);
    size_t total = (len + PAGE - 1) / PAGE * PAGE;
    if (write(out, buf, total) != (ssize_t)total)
        die("write output device");
    fsync(out);
    printf("KSCOPE-TRUTH-READY frames=%llu cache=%llu user=%llu bytes=%zu\n",
           (unsigned long long)frames, (unsigned long long)n_cache, (unsigned long long)n_user,
           len);
    fflush(stdout);
    for (;;)
        pause();
}
