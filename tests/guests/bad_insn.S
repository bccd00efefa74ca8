# Executes an instruction no CPU knows (UD2 with no IDT): the guest triple-faults, which
# rvmm treats like a reset.
.code64
.globl _start
_start:
    ud2
