//go:build lab

package main

import "github.com/axproject/ax/test/lab"

// labMain runs `axctl lab …`: this axctl was built with the lab.
var labMain = lab.Main
