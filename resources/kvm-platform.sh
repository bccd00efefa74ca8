# Sourced by resources/test.sh and resources/boot.sh: what kind of KVM this host has.
#   hardware  a KVM that runs guest code itself (VMX/SVM, nested hardware virtualization too)
#   emulated  kvm_pvm: guest kernel code is emulated and guest user space cannot run
#   none      no /dev/kvm
# On the last two, guests that need user space run in the nested-KVM machine
# (resources/nested-kvm.sh).
kvm_platform() {
    if [[ ! -e /dev/kvm ]]; then
        echo none
    elif [[ -e /sys/module/kvm_pvm ]]; then
        echo emulated
    else
        echo hardware
    fi
}
