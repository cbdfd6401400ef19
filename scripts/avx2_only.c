// An AVX2-only run on an AVX-512 host: preloaded into a process (LD_PRELOAD), this hides
// AVX-512, AVX10 and AMX from CPUID, so every library's run-time dispatch in that process picks
// the kernels it would pick on an AVX2 CPU: ONNX Runtime's MLAS, the gemm crate and Rust's
// is_x86_feature_detected (flowstep's attention kernels), ATen, MKL and oneDNN (PyTorch).
// glibc's own string functions choose before this runs; GLIBC_TUNABLES covers those. Run
// commands through scripts/avx2_only.sh, which builds this and sets both.
//
// How: Linux's CPUID faulting (the `cpuid_fault` CPU flag; KVM and Firecracker guests have it)
// makes each CPUID instruction raise SIGSEGV; the handler runs CPUID with faulting switched off
// for the moment, clears the bits and steps over the instruction. Threads inherit the faulting
// state; exec resets it, and the preload sets it again in the new program. The program's own
// SIGSEGV handlers (Python's faulthandler, Rust's stack-overflow guard) are kept aside:
// sigaction and signal for SIGSEGV are interposed, and every other SIGSEGV goes to what the
// program installed, or to the default action (the process dies of it).
//
// AVX2_ONLY_REPORT=1 prints, at exit, how many CPUID answers were masked (to check it worked).
// Two more settings, for scripts/intel_vendor.sh: AVX2_ONLY_HIDE=0 keeps AVX-512 visible, and
// AVX2_ONLY_VENDOR=GenuineIntel (12 characters) is the vendor CPUID's leaf 0 reports. MKL picks
// its kernels by vendor: on AMD it runs its generic code path whatever the CPU has, so the
// vendor decides how fast PyTorch's float32 products are on the same silicon.
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <dlfcn.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

static uint64_t answered, masked, vendor_replaced; // updated atomically: any thread may fault
static int hide = 1;        // AVX2_ONLY_HIDE: hide AVX-512 (the default)
static char vendor[13];     // AVX2_ONLY_VENDOR: the vendor to report, when set
static int installed;                   // our handler is in place: SIGSEGV calls are interposed
static struct sigaction program_action; // the SIGSEGV action the program asked for
static int (*next_sigaction)(int, const struct sigaction *, struct sigaction *);
static sighandler_t (*next_signal)(int, sighandler_t);

static long set_cpuid_allowed(int allowed) { return syscall(SYS_arch_prctl, ARCH_SET_CPUID, allowed); }

static void hide_avx512(uint32_t leaf, uint32_t subleaf, uint32_t r[4]) {
    uint32_t before[4];
    memcpy(before, r, sizeof before);
    if (leaf == 7 && subleaf == 0) {
        // EBX: AVX512F, DQ, IFMA, PF, ER, CD, BW, VL
        r[1] &= ~(1u << 16 | 1u << 17 | 1u << 21 | 1u << 26 | 1u << 27 | 1u << 28 | 1u << 30 | 1u << 31);
        // ECX: VBMI, VBMI2, VNNI, BITALG, VPOPCNTDQ
        r[2] &= ~(1u << 1 | 1u << 6 | 1u << 11 | 1u << 12 | 1u << 14);
        // EDX: 4VNNIW, 4FMAPS, VP2INTERSECT, AMX-BF16, FP16, AMX-TILE, AMX-INT8
        r[3] &= ~(1u << 2 | 1u << 3 | 1u << 8 | 1u << 22 | 1u << 23 | 1u << 24 | 1u << 25);
    } else if (leaf == 7 && subleaf == 1) {
        r[0] &= ~(1u << 5 | 1u << 21);  // EAX: AVX512_BF16, AMX-FP16
        r[3] &= ~(1u << 19);            // EDX: AVX10
    } else if (leaf == 0x24) {
        r[0] = r[1] = r[2] = r[3] = 0;  // AVX10 version and vector lengths
    }
    if (memcmp(before, r, sizeof before) != 0) __atomic_fetch_add(&masked, 1, __ATOMIC_RELAXED);
}

// A SIGSEGV that is not a CPUID fault: the program's handler, or death by the signal.
static void forward(int sig, siginfo_t *info, void *context) {
    struct sigaction program = program_action;
    if (program.sa_flags & SA_RESETHAND) {
        memset(&program_action, 0, sizeof program_action);
        program_action.sa_handler = SIG_DFL;
    }
    if (program.sa_flags & SA_SIGINFO) {
        program.sa_sigaction(sig, info, context);
    } else if (program.sa_handler != SIG_DFL && program.sa_handler != SIG_IGN) {
        program.sa_handler(sig);
    } else {
        struct sigaction default_action = {.sa_handler = SIG_DFL};
        next_sigaction(sig, &default_action, NULL);
        // A fault recurs when its instruction runs again; a sent signal is sent again (it stays
        // blocked, so pending, until this handler returns).
        if (info->si_code <= 0) raise(sig);
    }
}

static void on_sigsegv(int sig, siginfo_t *info, void *context) {
    ucontext_t *uc = context;
    greg_t *g = uc->uc_mcontext.gregs;
    const uint8_t *ip = (const uint8_t *)g[REG_RIP];
    // A CPUID fault is a general-protection fault (SI_KERNEL) on the two bytes 0F A2.
    if (info->si_code != SI_KERNEL || ip[0] != 0x0f || ip[1] != 0xa2) {
        forward(sig, info, context);
        return;
    }
    uint32_t leaf = (uint32_t)g[REG_RAX], subleaf = (uint32_t)g[REG_RCX], r[4];
    set_cpuid_allowed(1);
    __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(subleaf));
    set_cpuid_allowed(0);
    __atomic_fetch_add(&answered, 1, __ATOMIC_RELAXED);
    if (hide) hide_avx512(leaf, subleaf, r);
    if (leaf == 0 && vendor[0]) {
        // The vendor string is EBX, EDX, ECX in that order.
        memcpy(&r[1], vendor, 4);
        memcpy(&r[3], vendor + 4, 4);
        memcpy(&r[2], vendor + 8, 4);
        __atomic_fetch_add(&vendor_replaced, 1, __ATOMIC_RELAXED);
    }
    g[REG_RAX] = r[0];
    g[REG_RBX] = r[1];
    g[REG_RCX] = r[2];
    g[REG_RDX] = r[3];
    g[REG_RIP] += 2;
}

static void report(void) {
    fprintf(stderr, "avx2_only: %llu CPUID answers, %llu with AVX-512 hidden\n",
            (unsigned long long)__atomic_load_n(&answered, __ATOMIC_RELAXED), (unsigned long long)__atomic_load_n(&masked, __ATOMIC_RELAXED));
    if (vendor[0]) fprintf(stderr, "cpuid vendor: %s in %llu answers\n", vendor, (unsigned long long)__atomic_load_n(&vendor_replaced, __ATOMIC_RELAXED));
}

int sigaction(int sig, const struct sigaction *action, struct sigaction *previous) {
    if (sig != SIGSEGV || !installed) return next_sigaction(sig, action, previous);
    if (previous) *previous = program_action;
    if (action) program_action = *action;
    return 0;
}

sighandler_t signal(int sig, sighandler_t handler) {
    if (sig != SIGSEGV || !installed) return next_signal(sig, handler);
    sighandler_t previous = program_action.sa_handler;
    memset(&program_action, 0, sizeof program_action);
    program_action.sa_handler = handler;
    program_action.sa_flags = SA_RESTART;
    return previous;
}

__attribute__((constructor)) static void start(void) {
    const char *hide_setting = getenv("AVX2_ONLY_HIDE"), *vendor_setting = getenv("AVX2_ONLY_VENDOR");
    if (hide_setting && strcmp(hide_setting, "0") == 0) hide = 0;
    if (vendor_setting && *vendor_setting) {
        if (strlen(vendor_setting) != 12) {
            fprintf(stderr, "avx2_only: AVX2_ONLY_VENDOR=%s is not a 12-character CPUID vendor (e.g. GenuineIntel)\n", vendor_setting);
            _exit(1);
        }
        memcpy(vendor, vendor_setting, 12);
    }
    next_sigaction = (int (*)(int, const struct sigaction *, struct sigaction *))dlsym(RTLD_NEXT, "sigaction");
    next_signal = (sighandler_t(*)(int, sighandler_t))dlsym(RTLD_NEXT, "signal");
    struct sigaction action = {0};
    action.sa_sigaction = on_sigsegv;
    // On the thread's alternate stack where it has one (a stack overflow's fault needs it).
    action.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&action.sa_mask);
    if (!next_sigaction || !next_signal || next_sigaction(SIGSEGV, &action, &program_action) != 0 || set_cpuid_allowed(0) != 0) {
        fprintf(stderr, "avx2_only: this kernel or CPU has no CPUID faulting (cpuid_fault); cannot hide AVX-512\n");
        _exit(1);
    }
    installed = 1;
    if (getenv("AVX2_ONLY_REPORT")) atexit(report);
}
