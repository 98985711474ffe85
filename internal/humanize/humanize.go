// Package humanize renders numbers for people reading the CLI's output.
package humanize

import "fmt"

// Bytes writes n in binary units, one decimal ("1.5 GiB"); below 1 KiB in bytes.
func Bytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit && exp < 4; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTP"[exp])
}
