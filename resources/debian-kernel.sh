# Sourced by build-stock-guest.sh and build-nested-kvm.sh (after lib.sh): one of Debian's
# kernel image packages, as the configured apt sources have it.

# resolve_kernel_package META: sets image_pkg (the linux-image-<abi>-<flavour> package META
# depends on), image_version (the version apt would install) and kver (its release).
resolve_kernel_package() {
    local meta=$1
    image_pkg=$(apt-cache depends "$meta" 2>/dev/null |
        awk '/Depends: linux-image-/ { print $2; exit }')
    [[ -n $image_pkg ]] || die "apt knows no $meta (run apt-get update?)"
    image_version=$(apt-cache policy "$image_pkg" | awk '/Candidate:/ { print $2 }')
    [[ -n $image_version && $image_version != "(none)" ]] ||
        die "no candidate version of $image_pkg"
    kver=${image_pkg#linux-image-}
}

# fetch_kernel_package DIR: downloads that package and unpacks it into DIR/pkg, with the
# modules.dep its postinst would make; copies vmlinuz and a kernel-version line to $out.
fetch_kernel_package() {
    local dir=$1
    (cd -- "$dir" && apt-get download -q "$image_pkg=$image_version" >&2)
    dpkg-deb -x "$dir"/"${image_pkg}"_*.deb "$dir/pkg"
    [[ -f $dir/pkg/boot/vmlinuz-$kver && -d $dir/pkg/lib/modules/$kver ]] ||
        die "$image_pkg has no vmlinuz-$kver or modules"
    depmod -b "$dir/pkg" "$kver"
    cp -- "$dir/pkg/boot/vmlinuz-$kver" "$out/vmlinuz"
    printf '%s %s\n' "$image_pkg" "$image_version" >"$out/kernel-version"
}
