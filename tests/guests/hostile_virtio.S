# A hostile virtio driver. It programs the virtio-mmio registers of a disk (slot 0, 0xd0000000)
# and a net device (slot 1, 0xd0001000) itself. Rings outside RAM must get DEVICE_NEEDS_RESET
# and a reset must recover. Then it posts malformed descriptor chains to the blk request queue
# and the net transmit queue, and checks that each comes back failed (blk: used length 0, or
# an IOERR status) without the device giving up. A valid disk read must still work: the guest
# prints the start of sector 1, sends one valid frame, checks both devices' status, and resets
# through the i8042. Output: "RVMM-HOSTILE <case> ok" per case, or "RVMM-HOSTILE <case> FAIL"
# and an immediate reset.
.code64

.set BLK, 0xd0000000
.set NET, 0xd0001000
.set QSIZE, 8
# virtio-mmio v2 registers
.set R_MAGIC, 0x000
.set R_DEVICE_ID, 0x008
.set R_DRV_FEAT, 0x020
.set R_DRV_FEAT_SEL, 0x024
.set R_QUEUE_SEL, 0x030
.set R_QUEUE_NUM, 0x038
.set R_QUEUE_READY, 0x044
.set R_NOTIFY, 0x050
.set R_STATUS, 0x070
.set R_DESC, 0x080
.set R_AVAIL, 0x090
.set R_USED, 0x0a0
# descriptor flags
.set F_NEXT, 1
.set F_WRITE, 2
.set F_INDIRECT, 4
# guest RAM used by the driver (the kernel image sits at 2 MiB)
.set MMIO_PD, 0x300000
.set BLK_DESC, 0x400000
.set NET_TX_DESC, 0x420000
.set NET_RX_DESC, 0x430000
.set HDR, 0x410000
.set DATA, 0x411000
.set STATUS, 0x412000
.set INDIRECT, 0x440000
.set FRAME, 0x450000
.set OUTSIDE, 0x7fff00000000
# polling gives up after this many TSC cycles (seconds on any host)
.set WAIT_CYCLES, 20000000000

# desc TABLE, SLOT, ADDR, LEN, FLAGS, NEXT: writes one descriptor.
.macro desc table, slot, addr, len, flags, next
    movabs $\addr, %rax
    mov %rax, \table + 16 * \slot
    movl $\len, \table + 16 * \slot + 8
    movw $\flags, \table + 16 * \slot + 12
    movw $\next, \table + 16 * \slot + 14
.endm

# blk_header TYPE, SECTOR
.macro blk_header type, sector
    movl $\type, HDR
    movl $0, HDR + 4
    movabs $\sector, %rax
    mov %rax, HDR + 8
    movb $0xff, STATUS
.endm

# start NAME: names the case that the following checks report on.
.macro start name
    lea \name(%rip), %r15
.endm

# expect_used STATE, HEAD, LEN: posts HEAD, waits for its used entry, checks id and length.
.macro expect_used state, head, len
    lea \state(%rip), %rdi
    mov $\head, %esi
    call post
    call wait_used
    cmp $\head, %eax
    jne fail
    cmp $\len, %edx
    jne fail
.endm

.globl _start
_start:
    call map_mmio
    # Rings in the MMIO hole, outside RAM: the device cannot start and says so with
    # DEVICE_NEEDS_RESET; the driver resets it and starts over properly.
    start n_blk_rings
    mov $BLK, %rbx
    mov $2, %esi
    lea bad_queues(%rip), %rdi
    mov $1, %ecx
    call init_device
    cmp $0x4f, %eax
    jne fail
    call ok
    start n_blk_init
    mov $BLK, %rbx
    mov $2, %esi
    lea blk_queues(%rip), %rdi
    mov $1, %ecx
    call init_device
    cmp $0xf, %eax
    jne fail
    start n_net_init
    mov $NET, %rbx
    mov $1, %esi
    lea net_queues(%rip), %rdi
    mov $2, %ecx
    call init_device
    cmp $0xf, %eax
    jne fail

    # A data buffer outside guest RAM: no trustworthy status byte, so used length 0.
    start n_blk_outside
    blk_header 0, 1
    desc BLK_DESC, 0, HDR, 16, F_NEXT, 1
    desc BLK_DESC, 1, OUTSIDE, 512, F_NEXT|F_WRITE, 2
    desc BLK_DESC, 2, STATUS, 1, F_WRITE, 0
    expect_used blk, 0, 0
    call ok

    # A length running far past the end of RAM.
    start n_blk_length
    desc BLK_DESC, 1, DATA, 0xfffff000, F_NEXT|F_WRITE, 2
    expect_used blk, 0, 0
    call ok

    # A descriptor loop: 0 -> 1 -> 0 -> ...
    start n_blk_loop
    desc BLK_DESC, 1, DATA, 512, F_NEXT|F_WRITE, 0
    expect_used blk, 0, 0
    call ok

    # A read whose data buffer is device-readable: IOERR in the status byte.
    start n_blk_direction
    desc BLK_DESC, 1, DATA, 512, F_NEXT, 2
    expect_used blk, 0, 1
    cmpb $1, STATUS
    jne fail
    call ok

    # A sector far past the end of the disk: IOERR.
    start n_blk_sector
    blk_header 0, 0xffffffffffff
    desc BLK_DESC, 1, DATA, 512, F_NEXT|F_WRITE, 2
    expect_used blk, 0, 1
    cmpb $1, STATUS
    jne fail
    call ok

    # An indirect table of 4096 chained descriptors (INDIRECT_DESC was not even negotiated).
    start n_blk_many
    mov $INDIRECT, %rdi
    xor %ecx, %ecx
1:  movq $HDR, (%rdi)
    movl $16, 8(%rdi)
    movw $F_NEXT, 12(%rdi)
    lea 1(%ecx), %eax
    mov %ax, 14(%rdi)
    add $16, %rdi
    inc %ecx
    cmp $4096, %ecx
    jb 1b
    desc BLK_DESC, 3, INDIRECT, 0x10000, F_INDIRECT, 0
    expect_used blk, 3, 0
    call ok

    # A head index beyond the queue: the device drops it (no used entry); the valid read
    # after it must be answered.
    start n_blk_head
    lea blk(%rip), %rdi
    mov $200, %esi
    call post
    blk_header 0, 1
    movb $0, DATA
    desc BLK_DESC, 0, HDR, 16, F_NEXT, 1
    desc BLK_DESC, 1, DATA, 512, F_NEXT|F_WRITE, 2
    desc BLK_DESC, 2, STATUS, 1, F_WRITE, 0
    expect_used blk, 0, 513
    cmpb $0, STATUS
    jne fail
    call ok

    # Net transmit: every chain is returned with length 0; only the valid frame reaches the
    # TAP (the host counts it).
    start n_net_outside
    desc NET_TX_DESC, 0, OUTSIDE, 100, 0, 0
    expect_used net_tx, 0, 0
    call ok
    start n_net_direction
    desc NET_TX_DESC, 0, FRAME, 72, F_WRITE, 0
    expect_used net_tx, 0, 0
    call ok
    start n_net_short
    desc NET_TX_DESC, 0, FRAME, 10, 0, 0
    expect_used net_tx, 0, 0
    call ok
    start n_net_length
    desc NET_TX_DESC, 0, FRAME, 0x7fffffff, 0, 0
    expect_used net_tx, 0, 0
    call ok
    start n_net_loop
    desc NET_TX_DESC, 0, FRAME, 12, F_NEXT, 1
    desc NET_TX_DESC, 1, FRAME+12, 60, F_NEXT, 0
    expect_used net_tx, 0, 0
    call ok
    start n_net_valid
    # virtio-net header (12 zero bytes), then a broadcast frame of EtherType 0x88b5 (local
    # experimental) from 52:54:00:00:00:01.
    movl $0xffffffff, FRAME + 12
    movw $0xffff, FRAME + 16
    movl $0x00005452, FRAME + 18
    movw $0x0100, FRAME + 22
    movw $0xb588, FRAME + 24
    desc NET_TX_DESC, 0, FRAME, 72, 0, 0
    expect_used net_tx, 0, 0
    call ok

    # Neither device gave up (DEVICE_NEEDS_RESET) or left DRIVER_OK.
    start n_status
    mov $BLK, %rbx
    cmpl $0xf, R_STATUS(%rbx)
    jne fail
    mov $NET, %rbx
    cmpl $0xf, R_STATUS(%rbx)
    jne fail
    call ok

    # The valid read's data: sector 1 starts with a NUL-terminated line.
    lea n_data(%rip), %rbx
    call puts
    mov $DATA, %rbx
    call puts
    jmp reset

# Maps the 2 MiB around the virtio-mmio window (uncached): the boot page tables cover only
# the first GiB. PDPT entry 3 (3-4 GiB) gets a fresh page directory.
map_mmio:
    mov $MMIO_PD, %rdi
    xor %eax, %eax
    mov $512, %ecx
    rep stosq
    mov $(0xd0000000 | 0x9b), %eax                  # P|RW|PWT|PCD|PS
    mov %rax, MMIO_PD + 8 * 128
    mov %cr3, %rax
    and $~0xfff, %rax
    mov (%rax), %rdx                                # PML4[0] -> PDPT
    and $~0xfff, %rdx
    movq $(MMIO_PD | 3), 24(%rdx)
    mov %cr3, %rax
    mov %rax, %cr3
    ret

# Resets the device at %rbx (device ID %esi) and sets DRIVER_OK with VERSION_1 only and %ecx
# queues of QSIZE, whose (desc, avail, used) addresses are quads at %rdi; returns the device
# status read back in %eax.
init_device:
    cmpl $0x74726976, R_MAGIC(%rbx)
    jne fail
    cmp R_DEVICE_ID(%rbx), %esi
    jne fail
    movl $0, R_STATUS(%rbx)
    movl $1, R_STATUS(%rbx)
    movl $3, R_STATUS(%rbx)
    movl $1, R_DRV_FEAT_SEL(%rbx)
    movl $1, R_DRV_FEAT(%rbx)
    movl $0, R_DRV_FEAT_SEL(%rbx)
    movl $0, R_DRV_FEAT(%rbx)
    movl $0xb, R_STATUS(%rbx)
    testl $8, R_STATUS(%rbx)
    jz fail
    xor %edx, %edx
1:  movl %edx, R_QUEUE_SEL(%rbx)
    movl $QSIZE, R_QUEUE_NUM(%rbx)
    mov (%rdi), %eax
    movl %eax, R_DESC(%rbx)
    movl $0, R_DESC + 4(%rbx)
    mov 8(%rdi), %eax
    movl %eax, R_AVAIL(%rbx)
    movl $0, R_AVAIL + 4(%rbx)
    mov 16(%rdi), %eax
    movl %eax, R_USED(%rbx)
    movl $0, R_USED + 4(%rbx)
    movl $1, R_QUEUE_READY(%rbx)
    add $24, %rdi
    inc %edx
    cmp %ecx, %edx
    jb 1b
    movl $0xf, R_STATUS(%rbx)
    mov R_STATUS(%rbx), %eax
    ret

# Queue state: avail ring, used ring, device base, queue index, next avail index, used
# entries seen.
.set Q_AVAIL, 0
.set Q_USED, 8
.set Q_DEV, 16
.set Q_INDEX, 24
.set Q_NEXT, 28
.set Q_SEEN, 30

# Makes head %esi available on the queue whose state is at %rdi.
post:
    mov Q_AVAIL(%rdi), %r8
    movzwl Q_NEXT(%rdi), %eax
    mov %eax, %ecx
    and $(QSIZE - 1), %ecx
    mov %si, 4(%r8, %rcx, 2)
    inc %eax
    mfence
    mov %ax, 2(%r8)
    mov %ax, Q_NEXT(%rdi)
    mfence
    ret

# Notifies the queue at %rdi until its next used entry appears; returns its id in %eax and
# length in %edx. Re-notifies while waiting, fails after WAIT_CYCLES.
wait_used:
    rdtsc
    shl $32, %rdx
    or %rdx, %rax
    mov %rax, %r10
    mov Q_USED(%rdi), %r8
    mov Q_DEV(%rdi), %r9
1:  mov Q_INDEX(%rdi), %eax
    mov %eax, R_NOTIFY(%r9)
    mov $1000, %ecx
2:  movzwl 2(%r8), %eax
    cmp Q_SEEN(%rdi), %ax
    jne 3f
    pause
    loop 2b
    rdtsc
    shl $32, %rdx
    or %rdx, %rax
    sub %r10, %rax
    movabs $WAIT_CYCLES, %rdx
    cmp %rdx, %rax
    jb 1b
    jmp fail
3:  movzwl Q_SEEN(%rdi), %ecx
    and $(QSIZE - 1), %ecx
    mov 4(%r8, %rcx, 8), %eax
    mov 8(%r8, %rcx, 8), %edx
    incw Q_SEEN(%rdi)
    ret

ok:
    lea prefix(%rip), %rbx
    call puts
    mov %r15, %rbx
    call puts
    lea s_ok(%rip), %rbx
    call puts
    ret

fail:
    lea prefix(%rip), %rbx
    call puts
    mov %r15, %rbx
    call puts
    lea s_fail(%rip), %rbx
    call puts
reset:
    mov $0xfe, %al
    out %al, $0x64
1:  hlt
    jmp 1b

# Writes the NUL-terminated string at %rbx to COM1.
puts:
    mov $0x3f8, %dx
1:  mov (%rbx), %al
    test %al, %al
    jz 2f
    out %al, %dx
    inc %rbx
    jmp 1b
2:  ret

# Driver state, in the (identity-mapped, writable) image itself.
.balign 8
blk_queues: .quad BLK_DESC, BLK_DESC + 0x100, BLK_DESC + 0x200
bad_queues: .quad 0xfff00000, BLK_DESC + 0x100, BLK_DESC + 0x200
net_queues: .quad NET_RX_DESC, NET_RX_DESC + 0x100, NET_RX_DESC + 0x200
            .quad NET_TX_DESC, NET_TX_DESC + 0x100, NET_TX_DESC + 0x200
blk:    .quad BLK_DESC + 0x100, BLK_DESC + 0x200, BLK
        .long 0
        .word 0, 0
.balign 8
net_tx: .quad NET_TX_DESC + 0x100, NET_TX_DESC + 0x200, NET
        .long 1
        .word 0, 0

prefix:        .asciz "RVMM-HOSTILE "
s_ok:          .asciz " ok\n"
s_fail:        .asciz " FAIL\n"
n_data:        .asciz "RVMM-HOSTILE read: "
n_blk_init:    .asciz "blk-init"
n_net_init:    .asciz "net-init"
n_blk_rings:   .asciz "blk-rings-outside-ram-needs-reset"
n_blk_outside: .asciz "blk-outside-ram"
n_blk_length:  .asciz "blk-absurd-length"
n_blk_loop:    .asciz "blk-loop"
n_blk_direction: .asciz "blk-wrong-direction"
n_blk_sector:  .asciz "blk-sector-past-end"
n_blk_many:    .asciz "blk-too-many-descriptors"
n_blk_head:    .asciz "blk-bad-head-then-valid-read"
n_net_outside: .asciz "net-outside-ram"
n_net_direction: .asciz "net-wrong-direction"
n_net_short:   .asciz "net-too-short"
n_net_length:  .asciz "net-absurd-length"
n_net_loop:    .asciz "net-loop"
n_net_valid:   .asciz "net-valid-frame"
n_status:      .asciz "device-status"
