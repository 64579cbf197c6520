// How long a cache line takes to go from one CPU to another and back: two threads, each pinned to one of the two
// CPUs, hand a counter back and forth. Built and loaded by llmbench/placement.py (plain C, no torch headers).
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <time.h>

typedef struct {
  _Alignas(64) atomic_long turn;  // odd: the second thread's turn; even: the first's
  _Alignas(64) long trips;
  int cpu;
  atomic_int failed;  // pinning failed, or the other side did not answer before the deadline
  double deadline;
} Shared;

static double now_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static int pin(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  return pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

// Waits until turn == want; 0, or -1 when the deadline passed or the other side failed.
static int wait_for(Shared* s, long want) {
  for (long spins = 1;; ++spins) {
    if (atomic_load_explicit(&s->turn, memory_order_acquire) == want) return 0;
    if ((spins & 4095) == 0 && (atomic_load(&s->failed) || now_s() > s->deadline)) return -1;
  }
}

static void* answer(void* arg) {
  Shared* s = arg;
  if (pin(s->cpu) != 0) {
    atomic_store(&s->failed, 1);
    return 0;
  }
  for (long i = 0; i < s->trips; ++i) {
    if (wait_for(s, 2 * i + 1) != 0) {
      atomic_store(&s->failed, 1);
      return 0;
    }
    atomic_store_explicit(&s->turn, 2 * i + 2, memory_order_release);
  }
  return 0;
}

// Nanoseconds a round trip between cpu_a and cpu_b took, the best of `batches` batches of `trips` each (the best:
// an interrupt or a preemption only lengthens a batch); -1 when a thread could not be pinned or the two took longer
// than `limit_s` in all (one of the CPUs busy with other work).
double round_trip_ns(int cpu_a, int cpu_b, long trips, int batches, double limit_s) {
  double best = -1;
  for (int b = 0; b < batches; ++b) {
    Shared s = {.trips = trips, .cpu = cpu_b, .deadline = now_s() + limit_s};
    atomic_init(&s.turn, 0);
    atomic_init(&s.failed, 0);
    pthread_t second;
    cpu_set_t before;
    if (pthread_getaffinity_np(pthread_self(), sizeof before, &before) != 0) return -1;
    if (pin(cpu_a) != 0) return -1;
    if (pthread_create(&second, 0, answer, &s) != 0) {
      pthread_setaffinity_np(pthread_self(), sizeof before, &before);
      return -1;
    }
    // the first trips wait for the new thread to start: the clock starts after a tenth of them
    const long warm = trips / 10;
    double start = now_s();
    int ok = 1;
    for (long i = 0; i < trips && ok; ++i) {
      if (i == warm) start = now_s();
      atomic_store_explicit(&s.turn, 2 * i + 1, memory_order_release);
      if (wait_for(&s, 2 * i + 2) != 0) ok = 0;
    }
    const double took = now_s() - start;
    if (!ok) atomic_store(&s.failed, 1);
    pthread_join(second, 0);
    pthread_setaffinity_np(pthread_self(), sizeof before, &before);
    if (!ok || atomic_load(&s.failed)) return -1;
    const double ns = took / (trips - warm) * 1e9;
    if (best < 0 || ns < best) best = ns;
  }
  return best;
}
