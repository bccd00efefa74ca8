# Checks the 64-bit boot protocol state rvmm promises at the kernel entry point and reports
# "RVMM-ENTRY ok" or the first check that failed, then resets.
.code64
.globl _start
_start:
    lea bad_cr0(%rip), %rbx
    mov %cr0, %rax
    mov $0x80000001, %ecx           # PG | PE
    and %rcx, %rax
    cmp %rcx, %rax
    jne report
    lea bad_cr4(%rip), %rbx
    mov %cr4, %rax
    test $0x20, %eax                # PAE
    jz report
    lea bad_efer(%rip), %rbx
    mov %rsi, %rdi                  # rdmsr clobbers edx:eax only; keep rsi anyway
    mov $0xc0000080, %ecx
    rdmsr
    and $0x500, %eax                # LME | LMA
    cmp $0x500, %eax
    jne report
    lea bad_rsi(%rip), %rbx
    cmp $0x7000, %rdi               # zero page
    jne report
    lea bad_rsp(%rip), %rbx
    cmp $0x8ff0, %rsp
    jne report
    lea bad_cs(%rip), %rbx
    mov %cs, %ax
    cmp $0x10, %ax                  # __BOOT_CS
    jne report
    lea bad_ds(%rip), %rbx
    mov %ds, %ax
    cmp $0x18, %ax                  # __BOOT_DS
    jne report
    lea bad_flag(%rip), %rbx
    cmpw $0xaa55, 0x71fe            # boot_params.hdr.boot_flag
    jne report
    lea bad_e820(%rip), %rbx
    cmpb $2, 0x71e8                 # boot_params.e820_entries
    jb report
    lea bad_cmdline(%rip), %rbx
    mov 0x7228, %eax                # boot_params.hdr.cmd_line_ptr
    cmpl $0x736e6f63, (%rax)        # "cons"ole=…
    jne report
    lea ok(%rip), %rbx
report:
    call puts
    mov $0xfe, %al
    out %al, $0x64
1:  hlt
    jmp 1b

puts:
    mov $0x3f8, %dx
2:  mov (%rbx), %al
    test %al, %al
    jz 3f
    out %al, %dx
    inc %rbx
    jmp 2b
3:  ret

ok:          .asciz "RVMM-ENTRY ok\n"
bad_cr0:     .asciz "RVMM-ENTRY bad cr0\n"
bad_cr4:     .asciz "RVMM-ENTRY bad cr4\n"
bad_efer:    .asciz "RVMM-ENTRY bad efer\n"
bad_rsi:     .asciz "RVMM-ENTRY bad rsi\n"
bad_rsp:     .asciz "RVMM-ENTRY bad rsp\n"
bad_cs:      .asciz "RVMM-ENTRY bad cs\n"
bad_ds:      .asciz "RVMM-ENTRY bad ds\n"
bad_flag:    .asciz "RVMM-ENTRY bad boot_flag\n"
bad_e820:    .asciz "RVMM-ENTRY bad e820\n"
bad_cmdline: .asciz "RVMM-ENTRY bad cmdline\n"
