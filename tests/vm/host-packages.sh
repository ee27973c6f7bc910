# Sourced by build.sh and build-trixie.sh: installs what this machine lacks to build and boot a
# guest. What the user has stays: a newer qemu-utils (and what comes with it) is downgraded to
# the release's, never removed.
#
# install_host_packages PKG...: apt-get install them. Installing qemu-system-x86 brings the
# release's qemu-system-common, which a newer qemu-utils (from backports) breaks: then
# qemu-utils is asked for too, at the release's version (a downgrade, so qemu-img and qemu-nbd
# stay on the machine), in the same step.
install_host_packages() {
  local pkgs=("$@") rel
  if [[ " ${pkgs[*]} " == *" qemu-system-x86 "* && " ${pkgs[*]} " != *" qemu-utils "* ]]; then
    pkgs+=(qemu-utils)
  fi
  timeout 300 apt-get update -qq
  local err
  err=$(DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq "${pkgs[@]}" 2>&1) \
    && return 0
  echo "$err" | tail -5 >&2
  rel=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
  [[ -n $rel && " ${pkgs[*]} " == *" qemu-utils "* ]] || return 1
  echo "ballast-vm: retrying with $rel's qemu-utils (a newer one blocks $rel's qemu-system-x86)"
  local i
  for i in "${!pkgs[@]}"; do [[ ${pkgs[$i]} == qemu-utils ]] && pkgs[$i]=qemu-utils/$rel; done
  DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq --allow-downgrades "${pkgs[@]}" >/dev/null
}
