# A Linux /init that never makes a system call: it spins in user mode so the guest kernel
# stays up (interrupts, networking) on hosts where guest system calls cannot work.
.globl _start
_start:
    pause
    jmp _start
