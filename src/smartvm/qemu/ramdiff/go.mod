module smartvm/ramdiff

go 1.19
