# Call 3: the long config at 4096/512 with the stock recipe in the same run (issue 14's 8x point on this card).
. scripts/device/prelude.sh
step long_with_stock 500 python3 benchmarks/long_documents.py --lengths 4096/512 --sumtune config --steps 8
