// SPDX-License-Identifier: GPL-2.0
/*
 * rvmm in-guest device self-test (built into rvmm's *test* kernel only).
 *
 * Why this exists: on nested KVM hosts that emulate guest kernel code
 * (kvm_pvm), guest user space cannot make system calls, so no test program
 * can run in the guest. Instead this code runs inside the kernel, after the
 * root file system is mounted and just before init would be executed, and
 * exercises rvmm's devices through Linux's own drivers: the VFS, the page
 * cache, the block layer and the tty layer. It never touches device
 * registers itself.
 *
 * It is enabled at boot with a comma-separated list of checks or groups:
 *
 *	rvmm_selftest=blk,console
 *
 * Without that switch rvmm_selftest_run() returns at once and the boot goes
 * on normally. With it, each selected check prints exactly one line
 *
 *	RVMM-SELFTEST <name> ok <detail>
 *	RVMM-SELFTEST <name> fail <detail>
 *
 * followed by
 *
 *	RVMM-SELFTEST done passed=<n> failed=<m>
 *
 * and then the machine is restarted (kernel_restart()); with reboot=k rvmm
 * sees the keyboard-controller reset and exits 0. With
 *
 *	rvmm_selftest.poweroff=1
 *
 * it is powered off instead (kernel_power_off(): ACPI S5 through rvmm's sleep
 * control register, which also ends rvmm with 0). rvmm's host tests parse
 * these lines: keep the format exactly as it is.
 *
 * The VM the host test starts has: vda = ext4 root (rw), vdb = read-only disk
 * with a serial, vdc = scratch disk (rw, at least 1 MiB, its content is
 * overwritten), and, for "console", a virtio-console (hvc0).
 *
 * For "rng", "net" and "vsock" it also has a virtio-rng, a virtio-net whose
 * eth0 the kernel configures from ip=..., and a virtio-vsock; the host side
 * of the network checks is named on the command line:
 *
 *	rvmm_selftest.net=<host IPv4>:<TCP port>	(net-tcp)
 *	rvmm_selftest.vsock_port=<port>			(vsock-connect, to CID 2)
 *	rvmm_selftest.vsock_listen=<port>		(vsock-listen, default 5001)
 *
 * "acpi" reports the ACPI tables rvmm generated (their signatures and OEM id,
 * as /sys/firmware/acpi/tables would list them) and how many virtio-mmio
 * devices (LNRO0005) the DSDT described to the kernel.
 *
 * Guest kernel code may run at ~1 MIPS (emulated), so the checks move little
 * data and avoid expensive formatting in loops.
 *
 * Adding a check: write a function with the check_fn signature and add it to
 * the checks[] table with its name and group.
 */

#include <linux/acpi.h>
#include <linux/blkdev.h>
#include <linux/inet.h>
#include <linux/in.h>
#include <linux/net.h>
#include <linux/socket.h>
#include <linux/uio.h>
#include <net/af_vsock.h>
#include <net/sock.h>
#include <linux/delay.h>
#include <linux/err.h>
#include <linux/file.h>
#include <linux/fs.h>
#include <linux/init.h>
#include <linux/kernel.h>
#include <linux/kthread.h>
#include <linux/ktime.h>
#include <linux/mm.h>
#include <linux/mman.h>
#include <linux/sched/mm.h>
#include <linux/sched/signal.h>
#include <linux/completion.h>
#include <linux/uaccess.h>
#include <linux/mount.h>
#include <linux/pagemap.h>
#include <linux/printk.h>
#include <linux/reboot.h>
#include <linux/sizes.h>
#include <linux/slab.h>
#include <linux/string.h>

/* Declared here rather than in a header: init/main.c is the only caller. */
void rvmm_selftest_run(void);

#define TAG "RVMM-SELFTEST"

/*
 * The result lines must reach the console even when the command line says
 * "quiet" (console_loglevel 4), so they are printed at KERN_EMERG. Progress
 * chatter is KERN_INFO and may be hidden.
 */
#define result(fmt, ...) pr_emerg(TAG " " fmt "\n", ##__VA_ARGS__)
#define info(fmt, ...) pr_info("rvmm-selftest: " fmt "\n", ##__VA_ARGS__)

/* The rvmm_selftest= value; kept after boot (the checks run after init memory is freed). */
static char selftest_arg[256];

static int __init rvmm_selftest_setup(char *str)
{
	strscpy(selftest_arg, str, sizeof(selftest_arg));
	return 1;
}
__setup("rvmm_selftest=", rvmm_selftest_setup);

/* rvmm_selftest.net=<IPv4>:<port>: the host's TCP listener for net-tcp. */
static char selftest_net[64];
/* rvmm_selftest.vsock_port=<port>: the host's vsock listener (CID 2) for vsock-connect. */
static unsigned int selftest_vsock_port;
/* rvmm_selftest.vsock_listen=<port>: the guest port vsock-listen listens on. */
static unsigned int selftest_vsock_listen = 5001;

static int __init rvmm_selftest_net_setup(char *str)
{
	strscpy(selftest_net, str, sizeof(selftest_net));
	return 1;
}
__setup("rvmm_selftest.net=", rvmm_selftest_net_setup);

static int __init rvmm_selftest_vsock_port_setup(char *str)
{
	if (kstrtouint(str, 10, &selftest_vsock_port))
		selftest_vsock_port = 0;
	return 1;
}
__setup("rvmm_selftest.vsock_port=", rvmm_selftest_vsock_port_setup);

static int __init rvmm_selftest_vsock_listen_setup(char *str)
{
	if (kstrtouint(str, 10, &selftest_vsock_listen))
		selftest_vsock_listen = 0;
	return 1;
}
__setup("rvmm_selftest.vsock_listen=", rvmm_selftest_vsock_listen_setup);

/* rvmm_selftest.poweroff=1: end with kernel_power_off() instead of kernel_restart(). */
static bool selftest_poweroff;

static int __init rvmm_selftest_poweroff_setup(char *str)
{
	if (kstrtobool(str, &selftest_poweroff))
		selftest_poweroff = false;
	return 1;
}
__setup("rvmm_selftest.poweroff=", rvmm_selftest_poweroff_setup);

/*
 * A check fills @detail (one line, no newline) and returns true if it passed.
 */
typedef bool (*check_fn)(char *detail, size_t len);

/* ---- block: write, fsync, drop the page cache, read back --------------------- */

#define BLK_WRITE_PATH "/rvmm-selftest.dat"
#define BLK_WRITE_SIZE SZ_64K
#define PATTERN_LINE_LEN 21 /* strlen("rvmm-selftest 000000\n") */

/*
 * Fill @buf with "rvmm-selftest %06u\n" for u = 0, 1, 2, ..., cut off at
 * @len bytes. The digits are written by hand: a few thousand snprintf()
 * calls would cost seconds of emulated CPU time.
 */
static void fill_pattern(char *buf, size_t len)
{
	char line[PATTERN_LINE_LEN];
	unsigned int u, v;
	size_t off, n;
	int i;

	memcpy(line, "rvmm-selftest ", 14);
	line[PATTERN_LINE_LEN - 1] = '\n';
	for (u = 0, off = 0; off < len; u++, off += n) {
		for (v = u, i = 19; i >= 14; i--, v /= 10)
			line[i] = '0' + v % 10;
		n = min_t(size_t, len - off, PATTERN_LINE_LEN);
		memcpy(buf + off, line, n);
	}
}

/* Index of the first byte where @a and @b differ, or -1 if they are equal. */
static long first_difference(const char *a, const char *b, size_t len)
{
	size_t i;

	if (!memcmp(a, b, len))
		return -1;
	for (i = 0; a[i] == b[i]; i++)
		;
	return i;
}

static bool check_blk_write(char *detail, size_t len)
{
	struct address_space *mapping;
	unsigned long cached, left;
	char *want = NULL, *got = NULL;
	struct super_block *sb;
	struct file *file;
	bool ok = false;
	loff_t pos;
	ssize_t n;
	long diff;
	int err;

	want = kvmalloc(BLK_WRITE_SIZE, GFP_KERNEL);
	got = kvmalloc(BLK_WRITE_SIZE, GFP_KERNEL);
	if (!want || !got) {
		scnprintf(detail, len, "out of memory");
		goto out_free;
	}
	fill_pattern(want, BLK_WRITE_SIZE);

	file = filp_open(BLK_WRITE_PATH, O_RDWR | O_CREAT | O_TRUNC | O_LARGEFILE, 0644);
	if (IS_ERR(file)) {
		scnprintf(detail, len, "open %s: %pe", BLK_WRITE_PATH, file);
		goto out_free;
	}

	pos = 0;
	n = kernel_write(file, want, BLK_WRITE_SIZE, &pos);
	if (n != BLK_WRITE_SIZE) {
		scnprintf(detail, len, "write of %d bytes returned %zd", BLK_WRITE_SIZE, n);
		goto out_close;
	}
	err = vfs_fsync(file, 0);
	if (err) {
		scnprintf(detail, len, "fsync: %pe", ERR_PTR(err));
		goto out_close;
	}

	/*
	 * Drop the file's pages from the page cache so that the read below has
	 * to come from the disk through rvmm's virtio-blk queue. After the
	 * fsync they are clean, so invalidation must be able to drop them all.
	 */
	mapping = file->f_mapping;
	cached = mapping->nrpages;
	err = filemap_write_and_wait(mapping);
	if (!err)
		err = invalidate_inode_pages2(mapping);
	left = mapping->nrpages;
	if (err || left) {
		scnprintf(detail, len, "could not drop the page cache (%pe, %lu of %lu pages left)",
			  ERR_PTR(err), left, cached);
		goto out_close;
	}

	memset(got, 0, BLK_WRITE_SIZE);
	pos = 0;
	n = kernel_read(file, got, BLK_WRITE_SIZE, &pos);
	if (n != BLK_WRITE_SIZE) {
		scnprintf(detail, len, "re-read of %d bytes returned %zd", BLK_WRITE_SIZE, n);
		goto out_close;
	}
	diff = first_difference(want, got, BLK_WRITE_SIZE);
	if (diff >= 0) {
		scnprintf(detail, len, "re-read differs at byte %ld (0x%02x, want 0x%02x)",
			  diff, (u8)got[diff], (u8)want[diff]);
		goto out_close;
	}

	/*
	 * The host test reads the file from the image with debugfs, which does
	 * not replay the ext4 journal, and the VM is restarted without an
	 * unmount. Freezing the file system checkpoints the journal, writing
	 * every metadata block to its home location.
	 */
	sb = file_inode(file)->i_sb;
	err = freeze_super(sb);
	if (!err)
		err = thaw_super(sb);
	if (err) {
		scnprintf(detail, len, "journal checkpoint (freeze/thaw): %pe", ERR_PTR(err));
		goto out_close;
	}

	scnprintf(detail, len,
		  "%s: wrote %d bytes, fsync ok, re-read them from the disk (page cache dropped: %lu pages -> 0), content matches",
		  BLK_WRITE_PATH, BLK_WRITE_SIZE, cached);
	ok = true;
out_close:
	filp_close(file, NULL);
out_free:
	kvfree(got);
	kvfree(want);
	return ok;
}

/* ---- block: a read-only disk refuses writes ---------------------------------- */

#define BLK_RO_DEV "/dev/vdb"

static bool check_blk_ro(char *detail, size_t len)
{
	struct block_device *bdev;
	struct file *file;
	char sector[512];
	bool ro;
	loff_t pos;
	ssize_t n;

	bdev = blkdev_get_by_path(BLK_RO_DEV, FMODE_READ, NULL);
	if (IS_ERR(bdev)) {
		scnprintf(detail, len, "open %s: %pe", BLK_RO_DEV, bdev);
		return false;
	}
	ro = bdev_read_only(bdev);
	blkdev_put(bdev, FMODE_READ);
	if (!ro) {
		scnprintf(detail, len, "%s is not read-only (bdev_read_only=0)", BLK_RO_DEV);
		return false;
	}

	/* Linux 6.1 lets a read-only disk be opened for writing; a write must fail. */
	file = filp_open(BLK_RO_DEV, O_RDWR | O_LARGEFILE, 0);
	if (IS_ERR(file)) {
		scnprintf(detail, len, "%s: bdev_read_only=1, open for writing fails with %pe",
			  BLK_RO_DEV, file);
		return true;
	}

	/*
	 * Write back what is already there, so that a device that wrongly
	 * accepts the write at least keeps its content.
	 */
	pos = 0;
	n = kernel_read(file, sector, sizeof(sector), &pos);
	if (n != sizeof(sector)) {
		scnprintf(detail, len, "read of sector 0 returned %zd", n);
		filp_close(file, NULL);
		return false;
	}
	pos = 0;
	n = kernel_write(file, sector, sizeof(sector), &pos);
	filp_close(file, NULL);
	if (n >= 0) {
		scnprintf(detail, len, "%s: bdev_read_only=1 but a write of %zu bytes returned %zd",
			  BLK_RO_DEV, sizeof(sector), n);
		return false;
	}
	scnprintf(detail, len, "%s: bdev_read_only=1, open for writing ok, write fails with %pe",
		  BLK_RO_DEV, ERR_PTR(n));
	return true;
}

/* ---- block: the disk serial (virtio-blk GET_ID) -------------------------------- */

#define BLK_SERIAL_DISK "vdb"

static bool check_blk_serial(char *detail, size_t len)
{
	struct file_system_type *sysfs;
	struct vfsmount *mnt;
	struct file *file;
	char serial[64];
	loff_t pos = 0;
	ssize_t n, i;

	/*
	 * Nothing has mounted /sys yet (init would), so mount a private
	 * instance of sysfs and read the attribute through it; reading it makes
	 * virtio-blk send a GET_ID request to the device.
	 */
	sysfs = get_fs_type("sysfs");
	if (!sysfs) {
		scnprintf(detail, len, "no sysfs");
		return false;
	}
	mnt = kern_mount(sysfs);
	put_filesystem(sysfs);
	if (IS_ERR(mnt)) {
		scnprintf(detail, len, "mount sysfs: %pe", mnt);
		return false;
	}

	file = file_open_root_mnt(mnt, "block/" BLK_SERIAL_DISK "/serial", O_RDONLY, 0);
	if (IS_ERR(file)) {
		scnprintf(detail, len, "open /sys/block/%s/serial: %pe", BLK_SERIAL_DISK, file);
		kern_unmount(mnt);
		return false;
	}
	n = kernel_read(file, serial, sizeof(serial) - 1, &pos);
	filp_close(file, NULL);
	kern_unmount(mnt);
	if (n < 0) {
		scnprintf(detail, len, "read /sys/block/%s/serial: %pe", BLK_SERIAL_DISK, ERR_PTR(n));
		return false;
	}

	/* Keep the result line one line of printable ASCII. */
	while (n > 0 && (serial[n - 1] == '\n' || serial[n - 1] == '\0'))
		n--;
	serial[n] = '\0';
	for (i = 0; i < n; i++)
		if (serial[i] < 0x21 || serial[i] > 0x7e)
			serial[i] = '?';

	scnprintf(detail, len, "%s=%s", BLK_SERIAL_DISK, serial);
	return n > 0;
}

/* ---- block: discard on the scratch disk ---------------------------------------- */

#define BLK_DISCARD_DEV "/dev/vdc"
#define BLK_DISCARD_SIZE SZ_1M

static bool check_blk_discard(char *detail, size_t len)
{
	struct block_device *bdev;
	struct inode *bd_inode;
	char *buf, *zero_check;
	struct file *file;
	unsigned int max;
	bool ok = false, zeroes;
	loff_t pos;
	ssize_t n;
	int err, i;

	buf = kvmalloc(SZ_64K, GFP_KERNEL);
	if (!buf) {
		scnprintf(detail, len, "out of memory");
		return false;
	}
	fill_pattern(buf, SZ_64K); /* any non-zero data will do */

	file = filp_open(BLK_DISCARD_DEV, O_RDWR | O_LARGEFILE, 0);
	if (IS_ERR(file)) {
		scnprintf(detail, len, "open %s: %pe", BLK_DISCARD_DEV, file);
		goto out_free;
	}
	bd_inode = file->f_mapping->host;
	bdev = I_BDEV(bd_inode);
	if (bdev_nr_bytes(bdev) < BLK_DISCARD_SIZE) {
		scnprintf(detail, len, "%s is smaller than %d bytes", BLK_DISCARD_DEV, BLK_DISCARD_SIZE);
		goto out_close;
	}
	max = bdev_max_discard_sectors(bdev);
	if (!max) {
		scnprintf(detail, len, "%s does not support discard", BLK_DISCARD_DEV);
		goto out_close;
	}

	/* 1 MiB of data at offset 0, so that the host image has blocks there... */
	for (pos = 0; pos < BLK_DISCARD_SIZE;) {
		n = kernel_write(file, buf, SZ_64K, &pos);
		if (n != SZ_64K) {
			scnprintf(detail, len, "write at %lld returned %zd", pos, n);
			goto out_close;
		}
	}
	err = vfs_fsync(file, 0);
	if (err) {
		scnprintf(detail, len, "fsync: %pe", ERR_PTR(err));
		goto out_close;
	}

	/*
	 * ...then discard it, as the BLKDISCARD ioctl does: drop the range from
	 * the page cache and send the discard down to the device.
	 */
	inode_lock(bd_inode);
	filemap_invalidate_lock(bd_inode->i_mapping);
	err = truncate_bdev_range(bdev, file->f_mode, 0, BLK_DISCARD_SIZE - 1);
	if (!err)
		err = blkdev_issue_discard(bdev, 0, BLK_DISCARD_SIZE >> SECTOR_SHIFT, GFP_KERNEL);
	filemap_invalidate_unlock(bd_inode->i_mapping);
	inode_unlock(bd_inode);
	if (err) {
		scnprintf(detail, len, "discard of %d bytes at 0: %pe", BLK_DISCARD_SIZE, ERR_PTR(err));
		goto out_close;
	}

	/*
	 * For information only (a discard need not zero): what the first 4 KiB
	 * read back as, from the disk (the range is no longer cached).
	 */
	zero_check = buf;
	pos = 0;
	n = kernel_read(file, zero_check, SZ_4K, &pos);
	zeroes = n == SZ_4K;
	for (i = 0; zeroes && i < SZ_4K; i++)
		zeroes = !zero_check[i];

	scnprintf(detail, len,
		  "%s: wrote+fsynced %d bytes at 0, discarded them (max_discard_sectors=%u), reads back as zeroes: %s",
		  BLK_DISCARD_DEV, BLK_DISCARD_SIZE, max, n == SZ_4K ? (zeroes ? "yes" : "no") : "read failed");
	ok = true;
out_close:
	filp_close(file, NULL);
out_free:
	kvfree(buf);
	return ok;
}

/* ---- block: cache flush on the root disk ---------------------------------------- */

#define BLK_FLUSH_DEV "/dev/vda"

static bool check_blk_flush(char *detail, size_t len)
{
	struct block_device *bdev;
	bool wc;
	int err;

	bdev = blkdev_get_by_path(BLK_FLUSH_DEV, FMODE_READ, NULL);
	if (IS_ERR(bdev)) {
		scnprintf(detail, len, "open %s: %pe", BLK_FLUSH_DEV, bdev);
		return false;
	}
	/*
	 * Without a volatile write cache (VIRTIO_BLK_F_FLUSH not negotiated)
	 * the block layer completes a flush without sending it to the device,
	 * which would test nothing; rvmm offers the feature.
	 */
	wc = bdev_write_cache(bdev);
	err = blkdev_issue_flush(bdev);
	blkdev_put(bdev, FMODE_READ);
	if (!wc) {
		scnprintf(detail, len, "%s has no volatile write cache: flushes never reach the device",
			  BLK_FLUSH_DEV);
		return false;
	}
	if (err) {
		scnprintf(detail, len, "%s: blkdev_issue_flush: %pe", BLK_FLUSH_DEV, ERR_PTR(err));
		return false;
	}
	scnprintf(detail, len, "%s: write cache on, blkdev_issue_flush returned 0", BLK_FLUSH_DEV);
	return true;
}

/* ---- console: a line through virtio-console (hvc0) ------------------------------ */

#define HVC_DEV "/dev/hvc0"
#define HVC_LINE "RVMM-SELFTEST-HVC hello from hvc0\n"

static bool check_console(char *detail, size_t len)
{
	struct file *file;
	loff_t pos = 0;
	ssize_t n;

	/* O_NOCTTY: this task (the future init) must not acquire a controlling tty. */
	file = filp_open(HVC_DEV, O_WRONLY | O_NOCTTY, 0);
	if (IS_ERR(file)) {
		if (PTR_ERR(file) == -ENOENT || PTR_ERR(file) == -ENODEV || PTR_ERR(file) == -ENXIO)
			scnprintf(detail, len, "no hvc0 (%pe)", file);
		else
			scnprintf(detail, len, "open %s: %pe", HVC_DEV, file);
		return false;
	}
	n = kernel_write(file, HVC_LINE, strlen(HVC_LINE), &pos);
	/* The last close waits (briefly) for hvc to push the output out. */
	filp_close(file, NULL);
	if (n != strlen(HVC_LINE)) {
		scnprintf(detail, len, "write of %zu bytes to %s returned %zd", strlen(HVC_LINE),
			  HVC_DEV, n);
		return false;
	}
	scnprintf(detail, len, "wrote %zd bytes to %s", n, HVC_DEV);
	return true;
}

/* ---- rng: read from /dev/hwrng (virtio-rng) ------------------------------------- */

#define HWRNG_DEV "/dev/hwrng"
#define RNG_BYTES 64
#define RNG_TIMEOUT_MS 30000

/*
 * /dev/hwrng only has a .read file operation (no .read_iter), so kernel_read()
 * refuses it and its read copies to a *user* address. The read therefore runs
 * in a kernel thread that borrows a fresh, empty user address space with one
 * anonymous page mapped, exactly like a process reading the device would.
 */
struct rng_job {
	struct completion done;
	u8 buf[RNG_BYTES];
	size_t got;
	ssize_t err;		/* last read result when got < RNG_BYTES */
	const char *step;	/* what failed */
};

static int rng_thread(void *data)
{
	struct rng_job *job = data;
	unsigned long deadline = jiffies + msecs_to_jiffies(RNG_TIMEOUT_MS);
	unsigned long addr;
	struct mm_struct *mm;
	struct file *file;
	loff_t pos = 0;
	ssize_t n;

	mm = mm_alloc();
	if (!mm) {
		job->step = "mm_alloc";
		job->err = -ENOMEM;
		goto out;
	}
	arch_pick_mmap_layout(mm, &current->signal->rlim[RLIMIT_STACK]);
	mm->task_size = TASK_SIZE;
	kthread_use_mm(mm);
	addr = vm_mmap(NULL, 0, PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
		       0);
	if (IS_ERR_VALUE(addr)) {
		job->step = "mmap";
		job->err = (long)addr;
		goto out_mm;
	}
	/* Non-blocking, polled with a deadline, so a silent device cannot hang the boot. */
	file = filp_open(HWRNG_DEV, O_RDONLY | O_NONBLOCK, 0);
	if (IS_ERR(file)) {
		job->step = "open " HWRNG_DEV;
		job->err = PTR_ERR(file);
		goto out_mm;
	}
	while (job->got < RNG_BYTES) {
		n = vfs_read(file, (char __user *)addr + job->got, RNG_BYTES - job->got, &pos);
		if (n > 0) {
			job->got += n;
			continue;
		}
		if ((n == -EAGAIN || n == 0) && time_before(jiffies, deadline)) {
			msleep(10);
			continue;
		}
		job->step = "read " HWRNG_DEV;
		job->err = n;
		break;
	}
	if (job->got && copy_from_user(job->buf, (void __user *)addr, job->got)) {
		job->step = "copy_from_user";
		job->err = -EFAULT;
		job->got = 0;
	}
	filp_close(file, NULL);
out_mm:
	kthread_unuse_mm(mm);
	mmput(mm);
out:
	complete(&job->done);
	return 0;
}

static bool check_rng(char *detail, size_t len)
{
	/* Static: if the thread were stuck past the timeout it would still own it. */
	static struct rng_job job;
	struct task_struct *task;
	int i;

	memset(&job, 0, sizeof(job));
	init_completion(&job.done);
	task = kthread_run(rng_thread, &job, "rvmm-selftest-rng");
	if (IS_ERR(task)) {
		scnprintf(detail, len, "kthread_run: %pe", task);
		return false;
	}
	if (!wait_for_completion_timeout(&job.done, msecs_to_jiffies(RNG_TIMEOUT_MS + 10000))) {
		scnprintf(detail, len, "reading %s timed out", HWRNG_DEV);
		return false;
	}
	if (job.got < RNG_BYTES) {
		scnprintf(detail, len, "%s: %pe after %zu of %d bytes", job.step ?: "?",
			  ERR_PTR(job.err), job.got, RNG_BYTES);
		return false;
	}
	for (i = 1; i < RNG_BYTES && job.buf[i] == job.buf[0]; i++)
		;
	scnprintf(detail, len, "%d bytes from %s, first %8phN", RNG_BYTES, HWRNG_DEV, job.buf);
	if (i == RNG_BYTES) {
		strlcat(detail, " (all bytes equal)", len);
		return false;
	}
	return true;
}

/* ---- socket helpers (kernel sockets, every wait bounded by a timeout) ------------ */

#define SOCK_TIMEOUT (30 * HZ)

static void sock_timeouts(struct socket *sock, long timeout)
{
	sock->sk->sk_rcvtimeo = timeout;
	sock->sk->sk_sndtimeo = timeout;
}

/* Sends all of @buf; returns 0 or a negative errno. */
static int send_all(struct socket *sock, const void *buf, size_t size)
{
	size_t off = 0;
	int n;

	while (off < size) {
		struct msghdr msg = { .msg_flags = MSG_NOSIGNAL };
		struct kvec vec = { .iov_base = (void *)buf + off, .iov_len = size - off };

		n = kernel_sendmsg(sock, &msg, &vec, 1, vec.iov_len);
		if (n < 0)
			return n;
		if (n == 0)
			return -EPIPE;
		off += n;
	}
	return 0;
}

/*
 * Reads one line (up to and including '\n') into @buf, NUL-terminated, at most
 * @size - 1 bytes; returns its length, or a negative errno (-ENODATA on EOF
 * before a newline). Reads one byte at a time so nothing past the line is lost.
 */
static int recv_line(struct socket *sock, char *buf, size_t size)
{
	size_t off = 0;
	int n;

	while (off + 1 < size) {
		struct msghdr msg = {};
		struct kvec vec = { .iov_base = buf + off, .iov_len = 1 };

		n = kernel_recvmsg(sock, &msg, &vec, 1, 1, 0);
		if (n < 0)
			return n;
		if (n == 0)
			break;
		if (buf[off++] == '\n') {
			buf[off] = '\0';
			return off;
		}
	}
	buf[off] = '\0';
	return off + 1 < size ? -ENODATA : -EMSGSIZE;
}

/* Drops the trailing newline of a received line, for printing. */
static const char *chomp(char *line)
{
	line[strcspn(line, "\n")] = '\0';
	return line;
}

/* ---- net: a TCP round trip to the host over virtio-net -------------------------- */

#define NET_SEND_SIZE SZ_64K

/*
 * net-tcp sends NET_SEND_SIZE bytes of fill_pattern() to the host, then
 * shutdown(SHUT_WR). The host answers with one line
 *
 *	<len> <sum32>\n
 *
 * in decimal, where len is the number of bytes it received and sum32 is the
 * wrapping 32-bit sum of those bytes (each byte taken as unsigned, 0..255).
 */
static u32 sum32(const u8 *buf, size_t len)
{
	u32 sum = 0;

	while (len--)
		sum += *buf++;
	return sum;
}

static bool check_net_tcp(char *detail, size_t len)
{
	struct sockaddr_in addr = { .sin_family = AF_INET };
	char *colon = strchr(selftest_net, ':');
	char line[64], want[64];
	struct socket *sock;
	const char *end;
	u16 port;
	u8 *buf;
	u32 sum;
	int err;
	bool ok = false;

	if (!colon || !in4_pton(selftest_net, -1, (u8 *)&addr.sin_addr.s_addr, ':', &end) ||
	    end != colon || kstrtou16(colon + 1, 10, &port) || !port) {
		scnprintf(detail, len, "need rvmm_selftest.net=<IPv4>:<port>, got \"%s\"",
			  selftest_net);
		return false;
	}
	addr.sin_port = htons(port);

	buf = kmalloc(NET_SEND_SIZE, GFP_KERNEL);
	if (!buf) {
		scnprintf(detail, len, "out of memory");
		return false;
	}
	fill_pattern((char *)buf, NET_SEND_SIZE);
	sum = sum32(buf, NET_SEND_SIZE);
	snprintf(want, sizeof(want), "%u %u\n", NET_SEND_SIZE, sum);

	err = sock_create_kern(&init_net, AF_INET, SOCK_STREAM, IPPROTO_TCP, &sock);
	if (err) {
		scnprintf(detail, len, "socket: %pe", ERR_PTR(err));
		goto out_free;
	}
	sock_timeouts(sock, SOCK_TIMEOUT);
	err = kernel_connect(sock, (struct sockaddr *)&addr, sizeof(addr), 0);
	if (err) {
		scnprintf(detail, len, "connect %pI4:%u: %pe", &addr.sin_addr, port, ERR_PTR(err));
		goto out_sock;
	}
	err = send_all(sock, buf, NET_SEND_SIZE);
	if (err) {
		scnprintf(detail, len, "send to %pI4:%u: %pe", &addr.sin_addr, port, ERR_PTR(err));
		goto out_sock;
	}
	err = kernel_sock_shutdown(sock, SHUT_WR);
	if (err) {
		scnprintf(detail, len, "shutdown: %pe", ERR_PTR(err));
		goto out_sock;
	}
	err = recv_line(sock, line, sizeof(line));
	if (err < 0) {
		scnprintf(detail, len, "no answer from %pI4:%u: %pe", &addr.sin_addr, port,
			  ERR_PTR(err));
		goto out_sock;
	}
	ok = !strcmp(line, want);
	scnprintf(detail, len, "sent %u bytes sum32=%u to %pI4:%u, host counted \"%s\"",
		  NET_SEND_SIZE, sum, &addr.sin_addr, port, chomp(line));
out_sock:
	sock_release(sock);
out_free:
	kfree(buf);
	return ok;
}

/* ---- vsock: connect to the host, and accept a connection from it ---------------- */

#define VSOCK_PING "rvmm-selftest vsock ping\n"
#define VSOCK_PONG "pong\n"
#define VSOCK_ACCEPT_TIMEOUT (60 * HZ)

/* vsock-connect: connect to CID 2 (the host) port vsock_port, send VSOCK_PING, expect VSOCK_PONG. */
static bool check_vsock_connect(char *detail, size_t len)
{
	struct sockaddr_vm addr = {
		.svm_family = AF_VSOCK,
		.svm_cid = VMADDR_CID_HOST,
		.svm_port = selftest_vsock_port,
	};
	struct socket *sock;
	char line[64];
	int err;
	bool ok = false;

	if (!selftest_vsock_port) {
		scnprintf(detail, len, "need rvmm_selftest.vsock_port=<port>");
		return false;
	}
	err = sock_create_kern(&init_net, AF_VSOCK, SOCK_STREAM, 0, &sock);
	if (err) {
		scnprintf(detail, len, "socket: %pe", ERR_PTR(err));
		return false;
	}
	sock_timeouts(sock, SOCK_TIMEOUT);
	/* The connect timeout is vsock's own (2 s by default), not sk_sndtimeo. */
	vsock_sk(sock->sk)->connect_timeout = SOCK_TIMEOUT;
	err = kernel_connect(sock, (struct sockaddr *)&addr, sizeof(addr), 0);
	if (err) {
		scnprintf(detail, len, "connect cid 2 port %u: %pe", selftest_vsock_port,
			  ERR_PTR(err));
		goto out;
	}
	err = send_all(sock, VSOCK_PING, strlen(VSOCK_PING));
	if (err) {
		scnprintf(detail, len, "send: %pe", ERR_PTR(err));
		goto out;
	}
	err = recv_line(sock, line, sizeof(line));
	if (err < 0) {
		scnprintf(detail, len, "no answer from cid 2 port %u: %pe", selftest_vsock_port,
			  ERR_PTR(err));
		goto out;
	}
	ok = !strcmp(line, VSOCK_PONG);
	scnprintf(detail, len, "cid 2 port %u answered \"%s\"", selftest_vsock_port, chomp(line));
out:
	sock_release(sock);
	return ok;
}

/*
 * vsock-listen: listen on guest port vsock_listen, print
 * "RVMM-SELFTEST-VSOCK listening <port>" (the host connects after seeing it),
 * accept one connection within VSOCK_ACCEPT_TIMEOUT, read one line and send it
 * back unchanged.
 */
static bool check_vsock_listen(char *detail, size_t len)
{
	struct sockaddr_vm addr = {
		.svm_family = AF_VSOCK,
		.svm_cid = VMADDR_CID_ANY,
		.svm_port = selftest_vsock_listen,
	};
	struct socket *sock, *conn = NULL;
	char line[128];
	int err, n;
	bool ok = false;

	if (!selftest_vsock_listen) {
		scnprintf(detail, len, "bad rvmm_selftest.vsock_listen=");
		return false;
	}
	err = sock_create_kern(&init_net, AF_VSOCK, SOCK_STREAM, 0, &sock);
	if (err) {
		scnprintf(detail, len, "socket: %pe", ERR_PTR(err));
		return false;
	}
	sock_timeouts(sock, VSOCK_ACCEPT_TIMEOUT);
	err = kernel_bind(sock, (struct sockaddr *)&addr, sizeof(addr));
	if (!err)
		err = kernel_listen(sock, 1);
	if (err) {
		scnprintf(detail, len, "bind/listen port %u: %pe", selftest_vsock_listen,
			  ERR_PTR(err));
		goto out;
	}
	pr_emerg(TAG "-VSOCK listening %u\n", selftest_vsock_listen);
	err = kernel_accept(sock, &conn, 0);
	if (err) {
		scnprintf(detail, len, "accept on port %u: %pe", selftest_vsock_listen,
			  ERR_PTR(err));
		goto out;
	}
	sock_timeouts(conn, SOCK_TIMEOUT);
	n = recv_line(conn, line, sizeof(line));
	if (n < 0) {
		scnprintf(detail, len, "read on port %u: %pe", selftest_vsock_listen, ERR_PTR(n));
		goto out;
	}
	err = send_all(conn, line, n);
	if (err) {
		scnprintf(detail, len, "echo on port %u: %pe", selftest_vsock_listen, ERR_PTR(err));
		goto out;
	}
	ok = true;
	scnprintf(detail, len, "port %u echoed %d bytes \"%s\"", selftest_vsock_listen, n,
		  chomp(line));
out:
	if (conn)
		sock_release(conn);
	sock_release(sock);
	return ok;
}

/* ---- the table of checks and the runner ------------------------------------------ */

/* ---- acpi: the tables the kernel found and the devices the DSDT described ---- */

static bool check_acpi(char *detail, size_t len)
{
#ifdef CONFIG_ACPI
	static const char *const sigs[] = { ACPI_SIG_FADT, ACPI_SIG_MADT, ACPI_SIG_DSDT };
	char oem[ACPI_OEM_ID_SIZE + 1] = "";
	struct acpi_table_header *hdr;
	struct acpi_device *adev;
	unsigned int virtio = 0;
	size_t i, off = 0;
	bool ok = true;

	off += scnprintf(detail + off, len - off, "tables=");
	for (i = 0; i < ARRAY_SIZE(sigs); i++) {
		if (ACPI_FAILURE(acpi_get_table((char *)sigs[i], 1, &hdr))) {
			off += scnprintf(detail + off, len - off, "%s-missing,", sigs[i]);
			ok = false;
			continue;
		}
		memcpy(oem, hdr->oem_id, ACPI_OEM_ID_SIZE);
		acpi_put_table(hdr);
		off += scnprintf(detail + off, len - off, "%s,", sigs[i]);
	}
	for_each_acpi_dev_match(adev, "LNRO0005", NULL, -1)
		virtio++;
	scnprintf(detail + off, len - off, " oem=%s LNRO0005=%u", strim(oem), virtio);
	return ok && virtio > 0;
#else
	scnprintf(detail, len, "kernel built without CONFIG_ACPI");
	return false;
#endif
}

struct selftest_check {
	const char *name;	/* printed in the result line; selects this check */
	const char *group;	/* selects every check of the group */
	check_fn run;
};

/* Run in this order; blk-write runs first, while the disks are untouched. */
static const struct selftest_check checks[] = {
	{ "blk-write",   "blk",     check_blk_write },
	{ "blk-ro",      "blk",     check_blk_ro },
	{ "blk-serial",  "blk",     check_blk_serial },
	{ "blk-discard", "blk",     check_blk_discard },
	{ "blk-flush",   "blk",     check_blk_flush },
	{ "console",     "console", check_console },
	{ "rng",           "rng",   check_rng },
	{ "net-tcp",       "net",   check_net_tcp },
	{ "vsock-connect", "vsock", check_vsock_connect },
	{ "vsock-listen",  "vsock", check_vsock_listen },
	{ "acpi",          "acpi",  check_acpi },
};

/* Whether the comma-separated @list names @check or its group. */
static bool selected(const char *list, const struct selftest_check *check)
{
	const char *p = list;

	while (*p) {
		size_t n = strcspn(p, ",");

		if ((strlen(check->name) == n && !strncmp(p, check->name, n)) ||
		    (strlen(check->group) == n && !strncmp(p, check->group, n)))
			return true;
		p += n;
		if (*p == ',')
			p++;
	}
	return false;
}

/* Whether @word (@n bytes, not NUL-terminated) names any check or group. */
static bool known(const char *word, size_t n)
{
	size_t i;

	for (i = 0; i < ARRAY_SIZE(checks); i++)
		if ((strlen(checks[i].name) == n && !strncmp(word, checks[i].name, n)) ||
		    (strlen(checks[i].group) == n && !strncmp(word, checks[i].group, n)))
			return true;
	return false;
}

/*
 * Called by kernel_init() once the root file system is mounted and init
 * memory is freed, right before init is executed. Does nothing unless
 * rvmm_selftest= is on the command line; otherwise it does not return.
 */
void rvmm_selftest_run(void)
{
	unsigned int passed = 0, failed = 0;
	char detail[256];
	const char *p;
	ktime_t start;
	size_t i, n;

	if (!selftest_arg[0])
		return;

	info("running \"%s\"", selftest_arg);

	/* A name that selects nothing is a failure, not silently no test. */
	for (p = selftest_arg; *p; p += n + (p[n] == ',')) {
		n = strcspn(p, ",");
		if (n && !known(p, n)) {
			result("%.*s fail unknown check", (int)n, p);
			failed++;
		}
	}

	for (i = 0; i < ARRAY_SIZE(checks); i++) {
		bool ok;

		if (!selected(selftest_arg, &checks[i]))
			continue;
		detail[0] = '\0';
		start = ktime_get();
		ok = checks[i].run(detail, sizeof(detail));
		/*
		 * Files closed by a kernel thread are released by a work item;
		 * finish those releases (e.g. hvc's drain on close) before the
		 * next check.
		 */
		flush_delayed_fput();
		result("%s %s %s", checks[i].name, ok ? "ok" : "fail", detail);
		info("%s took %lld ms", checks[i].name, ktime_ms_delta(ktime_get(), start));
		if (ok)
			passed++;
		else
			failed++;
	}

	result("done passed=%u failed=%u", passed, failed);

	/* printk is synchronous here; the pause lets a buffering console drain. */
	msleep(20);
	if (selftest_poweroff)
		kernel_power_off();
	kernel_restart(NULL);
}
