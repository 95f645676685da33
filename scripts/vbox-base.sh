#!/usr/bin/env bash
# Builds the VirtualBox base VM that corral's host agent (`corral-agent
# host --provider virtualbox`) makes nodes from, as linked clones of its
# snapshot: Debian 12 with the VirtualBox Guest Additions (VBoxControl reads
# the boot configuration from guest properties), corral's packages from
# scripts/package.sh (corral-agent, todomvc), nginx, PostgreSQL 15 and
# consul with their own units off (the agent runs them), and
# corral-vbox-firstboot.service enabled. Then it powers the VM off and takes
# the snapshot.
#
#   scripts/vbox-base.sh                     from the Vagrant box bento/debian-12 (has the Guest Additions)
#   scripts/vbox-base.sh --box NAME          from another Debian 12 Vagrant box with the Guest Additions
#   scripts/vbox-base.sh --iso PATH          from a Debian 12 installer ISO (VirtualBox's unattended
#                                            install, Guest Additions included; slower)
#   --name NAME (corral-base)  --snapshot NAME (base)  --debs DIR (target/debian)
#
# Idempotent: a base VM that already has the snapshot is left alone. To
# rebuild (new packages), delete it first: VBoxManage unregistervm corral-base --delete
# (clones made from it must be deleted before).
set -euo pipefail
cd "$(dirname "$0")/.."

box=bento/debian-12
iso=
name=corral-base
snapshot=base
debs=${CORRAL_DEBS:-target/debian}
ssh_port=2299
while [ $# -gt 0 ]; do
  case "$1" in
    --box) box=${2:?--box needs a name}; shift ;;
    --iso) iso=${2:?--iso needs a path}; shift ;;
    --name) name=${2:?--name needs a name}; shift ;;
    --snapshot) snapshot=${2:?--snapshot needs a name}; shift ;;
    --debs) debs=${2:?--debs needs a directory}; shift ;;
    *) echo "vbox-base.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

started=$(date +%s)
step() { printf '==> [%3ds] %s\n' "$(( $(date +%s) - started ))" "$*" >&2; }
die() { echo "vbox-base.sh: $*" >&2; exit 1; }

command -v VBoxManage >/dev/null || die "VBoxManage not found: install VirtualBox"
[ -f "$debs/repo/Packages" ] || die "no apt repository in $debs/repo: run scripts/package.sh first"

if info=$(VBoxManage showvminfo "$name" --machinereadable 2>/dev/null); then
  if grep -Eq "^SnapshotName(-[0-9-]+)?=\"$snapshot\"$" <<<"$info"; then
    step "$name with snapshot $snapshot is there already"
    exit 0
  fi
  die "a VM named $name exists without a snapshot $snapshot: delete it (VBoxManage unregistervm $name --delete) and run this again"
fi

# What runs inside the VM, as root: the packages from the copied repository,
# the services' own units off, the first-boot unit on, and nothing that would
# make every clone the same machine.
install_script=$(cat <<'SH'
set -eu
export DEBIAN_FRONTEND=noninteractive
echo "deb [trusted=yes] file:/var/lib/corral-repo ./" > /etc/apt/sources.list.d/corral.list
mkdir -p /etc/postgresql-common/createcluster.d
echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.d/corral.conf
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
chmod 755 /usr/sbin/policy-rc.d
apt-get update -qq
apt-get install -y -qq --no-install-recommends corral-agent todomvc consul nginx-light postgresql-15 iproute2 nftables
rm -f /usr/sbin/policy-rc.d
systemctl mask nginx.service postgresql.service consul.service
systemctl enable /usr/lib/corral/corral-vbox-firstboot.service
command -v VBoxControl >/dev/null || { echo "no VBoxControl: the VM lacks the Guest Additions" >&2; exit 1; }
apt-get clean
# Each clone gets its own machine id (and so its own DHCP identity on NAT).
truncate -s 0 /etc/machine-id
rm -f /var/lib/dbus/machine-id
SH
)

wait_state() { # VM state, seconds
  local i
  for i in $(seq 1 "$2"); do
    VBoxManage showvminfo "$name" --machinereadable | grep -q "^VMState=\"$1\"" && return 0
    sleep 1
  done
  die "$name is not $1 after $2 s"
}

if [ -n "$iso" ]; then
  [ -f "$iso" ] || die "no ISO at $iso"
  password=$(head -c 18 /dev/urandom | base64 | tr -d '/+=')
  step "creating $name and installing Debian from $iso (unattended, with the Guest Additions)"
  VBoxManage createvm --name "$name" --ostype Debian_64 --groups /corral-base --register >/dev/null
  dir=$(dirname "$(VBoxManage showvminfo "$name" --machinereadable | sed -n 's/^CfgFile="\(.*\)"$/\1/p')")
  VBoxManage modifyvm "$name" --memory 1024 --cpus 1 --nic1 nat
  VBoxManage createmedium disk --filename "$dir/$name.vdi" --size 10240 >/dev/null
  VBoxManage storagectl "$name" --name SATA --add sata --controller IntelAhci
  VBoxManage storageattach "$name" --storagectl SATA --port 0 --device 0 --type hdd --medium "$dir/$name.vdi"
  VBoxManage storagectl "$name" --name IDE --add ide
  VBoxManage unattended install "$name" --iso="$iso" --user=corral --password="$password" \
    --full-user-name=corral --hostname=corral-base.corral.invalid --time-zone=UTC \
    --install-additions --start-vm=headless >/dev/null
  step "waiting for the installation and the Guest Additions (this takes a while)"
  guest() { VBoxManage guestcontrol "$name" --username root --password "$password" "$@"; }
  for i in $(seq 1 3600); do
    guest run --exe /bin/true >/dev/null 2>&1 && break
    [ "$i" = 3600 ] && die "the guest did not come up within an hour"
    sleep 1
  done
  step "copying the packages and installing them"
  guest mkdir --parents /var/lib/corral-repo
  guest copyto --target-directory /var/lib/corral-repo "$debs"/repo/*.deb "$debs"/repo/Packages "$debs"/repo/Release
  guest run --exe /bin/sh -- sh -c "$install_script"
  guest run --exe /sbin/poweroff >/dev/null 2>&1 || true
else
  home=${VAGRANT_HOME:-$HOME/.vagrant.d}
  command -v vagrant >/dev/null || die "vagrant not found: install it, or use --iso"
  if ! vagrant box list 2>/dev/null | grep -q "^$box "; then
    step "downloading the Vagrant box $box"
    vagrant box add --provider virtualbox "$box"
  fi
  ovf=$(find "$home/boxes/${box//\//-VAGRANTSLASH-}" -path '*virtualbox*' -name '*.ovf' | sort -V | tail -n 1)
  [ -n "$ovf" ] || die "no VirtualBox image of $box under $home/boxes"
  step "importing $ovf as $name"
  VBoxManage import "$ovf" --vsys 0 --vmname "$name" >/dev/null
  VBoxManage modifyvm "$name" --groups /corral-base --memory 1024 --cpus 1 \
    --natpf1 "corral-base-ssh,tcp,127.0.0.1,$ssh_port,,22"
  key=
  for k in "$home/insecure_private_key" "$home/insecure_private_keys/vagrant.key.rsa"; do
    [ -f "$k" ] && key=$k && break
  done
  [ -n "$key" ] || die "no Vagrant insecure key in $home"
  common=(-i "$key" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null
          -o LogLevel=ERROR -o ConnectTimeout=5)
  ssh_opts=("${common[@]}" -p "$ssh_port")
  step "booting $name"
  VBoxManage startvm "$name" --type headless >/dev/null
  for i in $(seq 1 300); do
    ssh "${ssh_opts[@]}" vagrant@127.0.0.1 true 2>/dev/null && break
    [ "$i" = 300 ] && die "no SSH into $name within 300 s"
    sleep 1
  done
  step "copying the packages and installing them"
  ssh "${ssh_opts[@]}" vagrant@127.0.0.1 "sudo mkdir -p /var/lib/corral-repo && sudo chown vagrant /var/lib/corral-repo"
  scp "${common[@]}" -P "$ssh_port" -q "$debs"/repo/*.deb "$debs"/repo/Packages "$debs"/repo/Release \
    vagrant@127.0.0.1:/var/lib/corral-repo/
  ssh "${ssh_opts[@]}" vagrant@127.0.0.1 "sudo sh -s" <<<"$install_script"
  ssh "${ssh_opts[@]}" vagrant@127.0.0.1 "sudo systemctl poweroff" || true
fi

step "waiting for $name to power off"
wait_state poweroff 300
# The clones reach the world through NAT (nic1) and the cluster through the
# host-only NIC the host agent adds (nic2); the forwarded SSH port is the
# builder's only.
VBoxManage modifyvm "$name" --natpf1 delete corral-base-ssh 2>/dev/null || true
VBoxManage snapshot "$name" take "$snapshot" --description "corral base: $(ls "$debs"/repo/corral-agent_*.deb | xargs -n1 basename)" >/dev/null
step "done: $name with snapshot $snapshot (clone source of corral-agent host --base-vm $name --base-snapshot $snapshot)"
