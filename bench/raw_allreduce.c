/* The baseline of bench/allreduce.sh: MPI_Allreduce (sum, float) of COUNT elements, in place,
 * REPEATS times after a warm-up; rank 0 prints the median seconds per call. With EVICT_MB > 0,
 * each rank writes that many MiB of other memory before each call, as a training step's
 * forward and backward passes do, so that the buffer is not sitting in cache. */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    if (argc != 3 && argc != 4) {
        fprintf(stderr, "usage: raw_allreduce COUNT REPEATS [EVICT_MB]\n");
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    long count = atol(argv[1]);
    int repeats = atoi(argv[2]);
    size_t evict = argc == 4 ? (size_t)atol(argv[3]) << 20 : 0;
    char *other = evict ? malloc(evict) : NULL;
    float *buf = malloc(sizeof(float) * count);
    double *t = malloc(sizeof(double) * repeats);
    for (long i = 0; i < count; i++) buf[i] = 1.0f;
    for (int i = 0; i < 5; i++)
        MPI_Allreduce(MPI_IN_PLACE, buf, (int)count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
    for (int i = 0; i < repeats; i++) {
        if (other) memset(other, i, evict);
        MPI_Barrier(MPI_COMM_WORLD);
        double start = MPI_Wtime();
        MPI_Allreduce(MPI_IN_PLACE, buf, (int)count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
        t[i] = MPI_Wtime() - start;
    }
    qsort(t, repeats, sizeof(double), cmp);
    int rank;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    if (rank == 0) printf("%.9f\n", t[repeats / 2]);
    free(buf);
    free(t);
    free(other);
    MPI_Finalize();
    return 0;
}
