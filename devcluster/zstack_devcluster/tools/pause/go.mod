// The pods' sandbox process (containerd's sandbox_image), built here instead of pulled. Build with `zstack-dev tools`.
module zstack.dev/devcluster/tools/pause

go 1.26.0
