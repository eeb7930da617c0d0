/* A no-op stand-in for pyxis (NVIDIA's SLURM container plugin) in the CI cluster.
 *
 * pyxis/enroot are not packaged for Debian, and without pyxis `srun --container-image=...`
 * fails with "unrecognized option". This SPANK plugin registers the pyxis options so that
 * the scripts in slurm/ run unchanged, ignores them, and exports what it was given to the tasks
 * (PYXIS_STUB_CONTAINER_IMAGE, PYXIS_STUB_CONTAINER_MOUNTS, PYXIS_STUB_CONTAINER_WORKDIR) so
 * tests can check the flags reached srun. Tasks run in the host environment.
 *
 * Built by .ci/slurm/start.sh: gcc -shared -fPIC -o spank_pyxis_stub.so spank_pyxis_stub.c
 */
#include <stdlib.h>
#include <string.h>
#include <slurm/spank.h>

SPANK_PLUGIN(pyxis_stub, 1);

enum { OPT_IMAGE = 1, OPT_MOUNTS, OPT_WORKDIR, OPT_OTHER };
static char *given[OPT_OTHER];

static int remember(int val, const char *optarg, int remote)
{
    (void)remote;
    if (val > 0 && val < OPT_OTHER) {
        free(given[val]);
        given[val] = optarg ? strdup(optarg) : NULL;
    }
    return 0;
}

#define ARG_OPT(name, val) {name, "VALUE", "[pyxis stub] accepted and ignored", 1, val, remember}
#define FLAG_OPT(name) {name, NULL, "[pyxis stub] accepted and ignored", 0, OPT_OTHER, remember}

struct spank_option spank_options[] = {
    ARG_OPT("container-image", OPT_IMAGE),
    ARG_OPT("container-mounts", OPT_MOUNTS),
    ARG_OPT("container-workdir", OPT_WORKDIR),
    ARG_OPT("container-name", OPT_OTHER),
    ARG_OPT("container-save", OPT_OTHER),
    ARG_OPT("container-env", OPT_OTHER),
    FLAG_OPT("container-mount-home"),
    FLAG_OPT("no-container-mount-home"),
    FLAG_OPT("container-remap-root"),
    FLAG_OPT("no-container-remap-root"),
    FLAG_OPT("container-writable"),
    FLAG_OPT("container-readonly"),
    FLAG_OPT("container-entrypoint"),
    FLAG_OPT("no-container-entrypoint"),
    SPANK_OPTIONS_TABLE_END
};

int slurm_spank_task_init(spank_t sp, int ac, char **av)
{
    (void)ac; (void)av;
    if (given[OPT_IMAGE]) spank_setenv(sp, "PYXIS_STUB_CONTAINER_IMAGE", given[OPT_IMAGE], 1);
    if (given[OPT_MOUNTS]) spank_setenv(sp, "PYXIS_STUB_CONTAINER_MOUNTS", given[OPT_MOUNTS], 1);
    if (given[OPT_WORKDIR]) spank_setenv(sp, "PYXIS_STUB_CONTAINER_WORKDIR", given[OPT_WORKDIR], 1);
    return 0;
}
